"""Free loopback ports for servers this project starts on the fly (tests, benches, scripts).

A port from binding port 0 lies in the kernel's ephemeral range, which every outgoing connection
draws its source port from: between picking it and the server's bind, a client connection on the
same host can take it, and the server dies with "address already in use" (seen in make bench,
2026-12-05). Ports below that range are never handed to outgoing connections, and this process
never hands out the same one twice, nor one of the compose topology's (``make up`` may be running).
"""

from __future__ import annotations

import functools
import random
import socket
from pathlib import Path

from scripts.topology import GATEWAY_PORT, ORCHESTRATOR_PORT, PROCESSORS, WHISPER

_LOWEST = 10_000  # below: registered ports of well-known services
_STANDARD = {GATEWAY_PORT, ORCHESTRATOR_PORT, *(p.port for p in [*PROCESSORS, WHISPER])}
_given: set[int] = set()


@functools.cache
def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default, and the IANA range starts above it


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port nobody listens on now, outside the ephemeral range when there is room
    below it (else one the kernel picks)."""
    highest = _ephemeral_start() - 1
    if highest - _LOWEST >= 1000:
        for _ in range(200):
            port = random.randint(_LOWEST, highest)
            if port not in _given and _bindable(port):
                _given.add(port)
                return port
    for _ in range(1000):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _given and port not in _STANDARD:
            _given.add(port)
            return port
    raise RuntimeError(f"no free loopback port: {len(_given)} handed out by this process already")

"""scripts/ports.py: the ports servers are started on in tests and benches."""

from __future__ import annotations

import socket

import pytest

from scripts import ports
from scripts.ports import _ephemeral_start, free_port


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port < _ephemeral_start() for port in ports)
    for port in ports[:20]:
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))


def test_a_port_someone_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))  # the kernel's pick: nobody else's, and never in ports._given
        listener.listen()
        busy = listener.getsockname()[1]
        picks = iter([busy, busy, 20_000, 20_001, 20_002])
        monkeypatch.setattr(ports, "_ephemeral_start", lambda: 65_000)  # busy is in the range then
        monkeypatch.setattr(ports.random, "randint", lambda low, high: next(picks))
        port = ports.free_port()
    assert port != busy and 20_000 <= port <= 20_002

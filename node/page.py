"""The gateway's browser page (``GET /``, its files under ``/page/``) and the model list it shows.

The page is plain static files in ``node/page/`` (no build step, no CDN: the hosts have no
internet), read once at start-up and served from memory with an ETag. Only files that exist in
that folder when the gateway starts are served, by exact name, so no request path ever reaches
the file system.

``GET /process/models`` merges the ``/status`` of every orchestrator the gateway knows into one
list: each model id once, its health (the best any orchestrator reports), load and capacity
(summed) and its kind, which tells the page whether to offer an image or a sound. Each
orchestrator gets a bounded wait; one that does not answer is skipped and counted, and named
only to a client on this host. Answers are reused for :data:`MODELS_TTL` seconds, so a page
polling every second, or many pages, cost one round of ``/status`` calls per second.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.errors import ApiError, from_loopback
from common.http import loads_json
from common.names import is_model_id
from common.trickle.subscriber import read_bounded

log = logging.getLogger("page")

PAGE_DIR = Path(__file__).parent / "page"
STATUS_TIMEOUT = 2.0  # one orchestrator's /status
MODELS_TTL = 1.0  # how long one merged answer is reused
MAX_STATUS_BYTES = 1024 * 1024
MAX_MODELS = 1000  # capabilities taken from one orchestrator
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".wav": "audio/wav",
    ".txt": "text/plain; charset=utf-8",
}
# Everything the page loads comes from this origin; blob: for the images and sounds it shows.
_SECURITY = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Transcribers take sound; everything else served here takes images. The registration carries no
# kind, so it is read from the model id's words.
_AUDIO_WORDS = re.compile(r"whisper|speech|audio|asr|transcri", re.IGNORECASE)


class Health(str, Enum):
    """A model's health as the page shows it, best first."""

    OK = "OK"
    LOADING = "LOADING"
    ERROR = "ERROR"
    UNKNOWN = "unknown"


# The orchestrator's container health (node.registry.Health) as the page's four states.
_HEALTH = {"OK": Health.OK, "IDLE": Health.OK, "LOADING": Health.LOADING, "ERROR": Health.ERROR,
           "UNREACHABLE": Health.ERROR}  # fmt: skip
_RANK = list(Health)


def model_kind(model_id: str) -> str:
    """``audio`` for a transcriber, else ``image``."""
    return "audio" if _AUDIO_WORDS.search(model_id) else "image"


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def load_page(folder: Path = PAGE_DIR) -> dict[str, StaticFile]:
    """Every file of the page by name, read once: the set of names a request can get."""
    files: dict[str, StaticFile] = {}
    for path in sorted(folder.iterdir()):
        content_type = _TYPES.get(path.suffix)
        if path.is_file() and content_type is not None:
            body = path.read_bytes()
            files[path.name] = StaticFile(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:16]}"')
    return files


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def merge_models(statuses: list[Any]) -> list[dict[str, Any]]:
    """One entry per model id over the orchestrators' ``/status`` bodies: health the best seen,
    load and capacity summed. Entries that are not well-formed are left out."""
    merged: dict[str, dict[str, Any]] = {}
    for status in statuses:
        capabilities = status.get("capabilities") if isinstance(status, dict) else None
        if not isinstance(capabilities, list):
            continue
        for capability in capabilities[:MAX_MODELS]:
            name = capability.get("name") if isinstance(capability, dict) else None
            if not isinstance(name, str) or not is_model_id(name):
                continue
            health = _HEALTH.get(str(capability.get("health")), Health.UNKNOWN)
            entry = merged.setdefault(
                name, {"id": name, "health": health, "load": 0, "capacity": 0, "kind": model_kind(name)}
            )
            entry["health"] = min(entry["health"], health, key=_RANK.index)
            entry["load"] += _count(capability.get("load"))
            entry["capacity"] += _count(capability.get("capacity"))
    return [{**entry, "health": entry["health"].value} for _, entry in sorted(merged.items())]


class ModelList:
    """``GET /process/models``: the orchestrators' capabilities, merged, reused for a second."""

    def __init__(self, client: httpx.AsyncClient, orch_addrs: list[str], ttl: float = MODELS_TTL) -> None:
        self.client = client
        self.orch_addrs = orch_addrs
        self.ttl = ttl
        self._lock = asyncio.Lock()  # one round of /status calls at a time; the others reuse it
        self._answer: tuple[float, list[dict[str, Any]], list[str]] | None = None

    async def _status(self, orch: str) -> Any:
        """One orchestrator's ``/status`` body, or None when it did not answer well in time."""
        try:
            async with asyncio.timeout(STATUS_TIMEOUT):
                request = self.client.build_request("GET", f"{orch}/status", timeout=STATUS_TIMEOUT)
                response = await self.client.send(request, stream=True)
                body = await read_bounded(response, MAX_STATUS_BYTES)
            if response.status_code != 200:
                raise ValueError(f"status {response.status_code}")
            return loads_json(body)
        except (httpx.HTTPError, TimeoutError, ValueError, RecursionError) as exc:
            log.warning("models: %s/status unusable (%r)", orch, exc)
            return None

    async def current(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The merged models and the orchestrators that did not answer, at most ``ttl`` old."""
        async with self._lock:
            if self._answer is None or time.monotonic() - self._answer[0] >= self.ttl:
                statuses = await asyncio.gather(*(self._status(o) for o in self.orch_addrs))
                failed = [o for o, s in zip(self.orch_addrs, statuses, strict=True) if s is None]
                self._answer = (time.monotonic(), merge_models(statuses), failed)
            return self._answer[1], self._answer[2]

    async def serve(self, request: Request) -> Response:
        models, failed = await self.current()
        body: dict[str, Any] = {"models": models, "unreachable": len(failed)}
        if failed and from_loopback(request.scope):  # addresses only for this host
            body["unreachable_orchestrators"] = failed
        return JSONResponse(body, headers={"Cache-Control": "no-store"})


class Page:
    """``GET /`` and ``GET /page/{name}`` from the files read at start-up."""

    def __init__(self, files: dict[str, StaticFile]) -> None:
        self.files = files

    def _serve(self, request: Request, name: str) -> Response:
        found = self.files.get(name)
        if found is None:
            raise ApiError(404, "not_found", f"the page has no file {name[:80]!r}; open / for the page")
        headers = {**_SECURITY, "ETag": found.etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == found.etag:
            return Response(status_code=304, headers=headers)
        return Response(found.body, media_type=found.content_type, headers=headers)

    async def index(self, request: Request) -> Response:
        return self._serve(request, "index.html")

    async def file(self, request: Request) -> Response:
        return self._serve(request, request.path_params["name"])


def page_routes(client: httpx.AsyncClient, orch_addrs: list[str]) -> list[Route]:
    """The page's routes for the gateway's app."""
    page = Page(load_page())
    models = ModelList(client, orch_addrs)
    return [
        Route("/", page.index, methods=["GET"]),
        Route("/page/{name}", page.file, methods=["GET"]),
        Route("/process/models", models.serve, methods=["GET"]),
    ]

"""One error shape for every component: ``{"error": "<code>", "detail": "<what and how to fix>"}``.

Handlers raise :class:`ApiError`; :func:`install_error_handlers` turns it (and Starlette's own
404/405) into that JSON body, and turns any other exception into a JSON 500, so that neither a bad
request nor a bug takes the process down or leaves the client with a plain-text page.
"""

from __future__ import annotations

import ipaddress
import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("errors")

# A scope key: the request's path as log lines may show it, when the path holds a secret.
LOG_PATH = "byoc.log_path"

_CODES_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An error the client caused or must know about, carried to the HTTP response as JSON."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _CODES_BY_STATUS.get(exc.status_code, "error")
    if exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 404:
        detail = f"no route {request.url.path}; see the README for the routes this service serves"
    else:
        detail = str(exc.detail)
    return JSONResponse({"error": code, "detail": detail}, status_code=exc.status_code, headers=exc.headers)


def from_loopback(scope: Scope) -> bool:
    """Whether the peer is this host: only then may an error detail show internals."""
    client = scope.get("client")
    try:
        return client is not None and ipaddress.ip_address(client[0]).is_loopback
    except ValueError:  # a unix socket path, or a name
        return False


def internal_error(exc: BaseException, scope: Scope) -> ApiError:
    """The 500 for an exception nobody expected; its message only goes to a local client."""
    what = f"{type(exc).__name__}: {str(exc)[:300]}" if from_loopback(scope) else type(exc).__name__
    return ApiError(500, "internal_error", f"unexpected error ({what}); the server log has the traceback")


class CatchAll:
    """ASGI middleware: an exception no handler took becomes a JSON 500, logged with its traceback.

    Starlette's own last-resort handler answers in plain text and re-raises, and uvicorn then
    closes the connection; here the exception ends with the answer, so a keep-alive connection
    stays usable. Once a response has started nothing can be said any more: that one re-raises.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except ClientDisconnect:  # nobody is left to answer: not a fault of ours
            log.info("%s %s: the client left before the answer", scope["method"], _logged_path(scope))
        except Exception as exc:
            log.exception("%s %s failed", scope["method"], _logged_path(scope))
            if started:
                raise
            await internal_error(exc, scope).response()(scope, receive, send)


def _logged_path(scope: Scope) -> str:
    return str(scope.get(LOG_PATH) or scope["path"])[:200]


def install_error_handlers(app: Starlette) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_exception)
    app.add_middleware(CatchAll)

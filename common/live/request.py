"""What a stream start or params update may say, checked where it enters.

The body is pytrickle's (``gateway_request_id`` required, five channel URLs, a free-form
``params`` object; ours adds optional booleans ``segments`` and ``read_along`` and the number
``idle_timeout``), sent by a go-livepeer
orchestrator or any pytrickle client. Everything in it is hostile until checked: URLs must be
plain http(s) and short, ids printable, ``params`` split into pytrickle's stream options
(checked with pytrickle's rules and messages) and the processor's own parameters (checked by the
processor, as for every other job).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..errors import ApiError
from ..http import loads_json

MAX_START_BYTES = 16 * 1024  # five URLs and a parameter object
MAX_URL_CHARS = 2048
MAX_ID_CHARS = 256
URL_KEYS = ("subscribe_url", "publish_url", "control_url", "events_url", "data_url")
# pytrickle's own keys inside ``params``: stream options, not processor parameters.
OPTION_KEYS = frozenset(
    {"width", "height", "max_framerate", "detect_out_resolution", "show_loading", "load_model"}
)
_TRUE, _FALSE = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no"})


class StreamApiError(ApiError):
    """Our error shape plus pytrickle's ``status``/``message`` keys, for pytrickle's clients."""

    def __init__(
        self, status: int, code: str, detail: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status, code, detail, headers)
        self.message = message

    def body(self) -> dict[str, str]:
        return {**super().body(), "status": "error", "message": self.message}


def bad_request(code: str, detail: str) -> ApiError:
    return ApiError(400, code, detail)


def start_error(code: str, detail: str) -> StreamApiError:
    return StreamApiError(400, code, detail, f"Error starting stream: {detail}")


@dataclass(frozen=True)
class StreamRequest:
    """A checked start body: who the stream is, where its channels are, what it starts with."""

    stream_id: str  # X-Stream-Id when go-livepeer sent one, else gateway_request_id
    gateway_request_id: str
    subscribe_url: str
    publish_url: str | None = None
    control_url: str | None = None
    events_url: str | None = None
    data_url: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # the processor's, checked
    options: dict[str, Any] = field(default_factory=dict)  # pytrickle's, checked
    # Frame per segment: each input segment is one input of the app's trickle job machinery
    # (what ``/live/{job}`` does), read from seq 0, whatever the processor's kind.
    segments: bool = False
    # The orchestrator answers an output write that asks for the next input with it, when that
    # one is whole already (Lp-Trickle-Read, ours: common/trickle/protocol.py).
    read_along: bool = False
    # Seconds without input after which the orchestrator ends the stream itself (its
    # -streamIdleTimeout); until then a quiet input is a quiet client, not a lost orchestrator.
    idle_timeout: float = 0.0

    def urls(self) -> dict[str, str | None]:
        return {key.removesuffix("_url"): getattr(self, key) for key in URL_KEYS}


def _flag(fields: dict[str, Any], key: str, when_true: str, when_false: str = "") -> bool:
    """An optional boolean of the start body (absent: false)."""
    value = fields.get(key, False)
    if not isinstance(value, bool):
        raise start_error(
            "invalid_request",
            f"{key} must be true ({when_true}) or false{f' ({when_false})' if when_false else ''}, "
            f"not {type(value).__name__}",
        )
    return value


def _idle_timeout(fields: dict[str, Any]) -> float:
    """The optional ``idle_timeout`` of the start body: seconds, 1 to a day (absent: 0)."""
    value = fields.get("idle_timeout", 0)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (value == 0 or 1 <= value <= 86400):
        raise start_error(
            "invalid_request",
            "idle_timeout must be the seconds, 1 to 86400, after which the orchestrator ends a stream"
            f" without input, not {str(value)[:40]!r}",
        )
    return float(value)


def parse_json_object(body: bytes, what: str, error: Callable[[str, str], ApiError]) -> dict[str, Any]:
    """``body`` as a JSON object, or ``error(code, detail)`` saying what is wrong with it."""
    try:
        value = loads_json(body)
    except (ValueError, RecursionError) as exc:  # also bad UTF-8 and 4,300-digit integers
        raise error("invalid_json", f"{what} must be a JSON object: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise error("invalid_json", f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def check_id(value: Any, name: str, error: Callable[[str, str], ApiError] = start_error) -> str:
    """A stream or request id: printable ASCII, short (it goes into logs, events and URLs)."""
    if not isinstance(value, str) or not value:
        raise error("invalid_request", f"{name} must be a non-empty string")
    if len(value) > MAX_ID_CHARS or not value.isascii() or not value.isprintable():
        raise error("invalid_request", f"{name} must be printable ASCII of at most {MAX_ID_CHARS} characters")
    return value


def check_url(value: Any, name: str) -> str | None:
    """An http(s) URL with a host, or ``None`` for an absent/empty one (pytrickle: channel unused)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise start_error("invalid_url", f"{name} must be a string URL, got {type(value).__name__}")
    if len(value) > MAX_URL_CHARS or not value.isascii() or not value.isprintable() or " " in value:
        raise start_error(
            "invalid_url", f"{name} must be a URL of printable ASCII, at most {MAX_URL_CHARS} chars"
        )
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises on a port that is not a number in range
    except ValueError as exc:
        raise start_error("invalid_url", f"{name} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise start_error(
            "invalid_url", f"{name} must be an http:// or https:// URL with a host, got {value!r}"
        )
    if parts.username is not None or parts.fragment:
        raise start_error("invalid_url", f"{name} must carry no user:password@ and no #fragment")
    return value.rstrip("/")


def _as_int(value: Any) -> int:
    # pytrickle coerces with int(): numbers and digit strings; not bools, not 1.5 silently
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    if isinstance(value, str) and len(value) > 12:
        raise ValueError(value)
    return int(value)


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ValueError(f"{name} must be a boolean, 0/1 or one of true/false/yes/no")


def check_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """pytrickle's stream options in ``params``, with pytrickle's rules and messages.

    Raises ``ValueError`` with pytrickle's message; the caller wraps it for its route.
    """
    options = {key: params[key] for key in OPTION_KEYS & params.keys()}
    dimensions = {"width", "height"} & options.keys()
    if dimensions and dimensions != {"width", "height"}:
        raise ValueError("Both 'width' and 'height' must be provided together")
    for key in dimensions:
        try:
            options[key] = _as_int(options[key])
        except (ValueError, TypeError, OverflowError):
            raise ValueError("Width and height must be valid integers or integer strings") from None
        if not 0 < options[key] <= 7680:
            raise ValueError("Width and height must be positive integers (at most 7680)")
    if "max_framerate" in options:
        try:
            rate = _as_int(options["max_framerate"])
        except (ValueError, TypeError, OverflowError):
            raise ValueError("max_framerate must be a valid integer") from None
        if rate <= 0:
            raise ValueError("max_framerate must be a positive integer")
        if rate > 60:
            raise ValueError("max_framerate cannot exceed 60 FPS")
        options["max_framerate"] = rate
    for key in ("detect_out_resolution", "show_loading", "load_model"):
        if key in options:
            options[key] = _as_bool(options[key], key)
    return options


def split_params(
    params: Any, validate: Callable[[Any], dict[str, Any]], error: Callable[[str, str], ApiError]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(processor parameters, stream options) from a ``params`` object, each checked."""
    if params is None:
        return {}, {}
    if not isinstance(params, dict):
        raise error("invalid_params", "params must be a JSON object (or null)")
    try:
        options = check_options(params)
    except ValueError as exc:
        raise error("invalid_params", str(exc)) from None
    own = {key: value for key, value in params.items() if key not in OPTION_KEYS}
    try:
        checked = validate(own)
    except ApiError as exc:
        raise error(exc.code, exc.detail) from None
    return checked, options


def parse_start(
    body: bytes, stream_id_header: str | None, validate: Callable[[Any], dict[str, Any]]
) -> StreamRequest:
    """Check a ``/stream/start`` body; a 400 :class:`StreamApiError` names what to fix."""
    if not body.strip():
        raise start_error("invalid_json", "the body is empty: send the start request as a JSON object")
    fields = parse_json_object(body, "the start body", start_error)
    if fields.get("gateway_request_id") is None:
        raise start_error("invalid_request", "gateway_request_id is required (the stream's request id)")
    request_id = check_id(fields["gateway_request_id"], "gateway_request_id")
    urls = {key: check_url(fields.get(key), key) for key in URL_KEYS}
    if urls["subscribe_url"] is None:
        raise start_error(
            "invalid_request", "subscribe_url is required: this container processes an input stream"
        )
    params, options = split_params(fields.get("params"), validate, start_error)
    segments = _flag(
        fields,
        "segments",
        "each input segment is one input, its result one output segment",
        "the processor's own kind of stream",
    )
    read_along = _flag(
        fields, "read_along", "the orchestrator answers an output write with the next input when it can"
    )
    stream_id = check_id(stream_id_header, "X-Stream-Id") if stream_id_header else request_id
    return StreamRequest(
        stream_id=stream_id,
        gateway_request_id=request_id,
        subscribe_url=urls["subscribe_url"],
        publish_url=urls["publish_url"],
        control_url=urls["control_url"],
        events_url=urls["events_url"],
        data_url=urls["data_url"],
        params=params,
        options=options,
        segments=segments,
        read_along=read_along,
        idle_timeout=_idle_timeout(fields),
    )

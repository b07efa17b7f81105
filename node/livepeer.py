"""go-livepeer's BYOC wire formats: the ``Livepeer`` job header, sender header and job token.

The header is standard base64 of a JSON object whose ``request`` and ``parameters`` are themselves
JSON-encoded strings, as go-livepeer's gateway sends it (the README's routes table, under "The node:
Gateway and Orchestrator", lists where it goes). Off-chain nothing is signed: the
sender is the zero address and ``sig`` is empty, which a go-livepeer orchestrator accepts.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field, replace
from typing import Any

from common.errors import ApiError
from common.http import loads_json
from common.names import check_job_id, check_model_id

JOB_HEADER = "Livepeer"
JOB_PREFIX = "/process/request/"  # + the job's path, forwarded to the container as POST /{path}
SENDER_HEADER = "Livepeer-Eth-Address"
CAPABILITY_HEADER = "Livepeer-Capability"
OFFCHAIN_SENDER = "0x0000000000000000000000000000000000000000"
# A header is read whole and decoded twice (base64, then JSON): cap it well under the server's own
# header limit, so a client cannot make every job pay for megabytes of JSON.
MAX_HEADER_CHARS = 16 * 1024
MAX_JSON_DEPTH = 32  # what a job description needs, far below Python's recursion limit
MAX_ORCHESTRATORS = 64  # entries in parameters.orchestrators.include / exclude
MAX_ADDRESS_CHARS = 512


def _bad_header(detail: str) -> ApiError:
    return ApiError(400, "invalid_livepeer_header", detail)


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping as soon as it passes ``limit`` (no deep recursion)."""
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > limit:
            return depth
        level = [
            child
            for item in level
            if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (dict, list))
        ]
    return depth


def loads_bounded(text: str | bytes, what: str, code: str = "invalid_livepeer_header") -> Any:
    """``json.loads`` that fails with a 400 for every input Python refuses: malformed JSON,
    integers over Python's digit limit (a ``ValueError``) and nesting deeper than the stack
    (a ``RecursionError``) or than :data:`MAX_JSON_DEPTH`."""
    try:
        value = loads_json(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]
        raise ApiError(400, code, f"{what} is not valid JSON ({reason})") from None
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ApiError(400, code, f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _json_object_string(value: Any, key: str) -> dict[str, Any]:
    """``request`` and ``parameters`` carry a JSON object encoded as a string."""
    if value in (None, ""):
        return {}
    parsed = loads_bounded(value, f'"{key}"') if isinstance(value, str) else None
    if not isinstance(parsed, dict):
        raise _bad_header(f'"{key}" must be a string holding a JSON object, such as "{{}}"')
    return parsed


@dataclass(frozen=True)
class OrchestratorFilter:
    """``parameters.orchestrators``: which orchestrator addresses a job may (not) use.

    Canonical (sorted, without duplicates), so equal filters compare and hash equal.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def allows(self, addr: str) -> bool:
        return (not self.include or addr in self.include) and addr not in self.exclude

    @classmethod
    def parse(cls, value: Any) -> OrchestratorFilter:
        if value is None:
            return cls()
        shape = '{"include": ["http://host:port", ...], "exclude": [...]}'
        if not isinstance(value, dict) or set(value) - {"include", "exclude"}:
            raise _bad_header(f'"parameters.orchestrators" must be an object like {shape}')
        lists = []
        for key in ("include", "exclude"):
            items = value.get(key) or []
            if (
                not isinstance(items, list)
                or len(items) > MAX_ORCHESTRATORS
                or not all(isinstance(i, str) and 0 < len(i) <= MAX_ADDRESS_CHARS for i in items)
            ):
                raise _bad_header(
                    f'"parameters.orchestrators.{key}" must be a list of at most {MAX_ORCHESTRATORS} '
                    f"orchestrator addresses (strings of 1-{MAX_ADDRESS_CHARS} characters)"
                )
            lists.append(tuple(sorted(set(items))))
        return cls(*lists)


@dataclass
class JobRequest:
    """The decoded ``Livepeer`` header of a request/response job."""

    capability: str
    timeout_seconds: int
    id: str = ""
    request: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def required(cls, header: str | None) -> JobRequest:
        """The job a request's ``Livepeer`` header describes, which the request must carry."""
        if header is None:
            raise ApiError(400, "missing_livepeer_header", f"the {JOB_HEADER} header is required")
        return cls.decode(header)

    @classmethod
    def decode(cls, header: str) -> JobRequest:
        if len(header) > MAX_HEADER_CHARS:
            raise _bad_header(f"the Livepeer header is over {MAX_HEADER_CHARS} characters")
        try:
            text = base64.b64decode(header, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_header(
                "the Livepeer header must be base64 of a JSON object with capability and timeout_seconds"
            ) from None
        payload = loads_bounded(text, "the Livepeer header")
        if not isinstance(payload, dict):
            raise _bad_header("the Livepeer header must hold a JSON object")
        capability = payload.get("capability")
        if not isinstance(capability, str) or not capability:
            raise _bad_header('the Livepeer header lacks "capability" (the model id)')
        check_model_id(capability, "the Livepeer header's capability")
        timeout = payload.get("timeout_seconds")
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
            raise _bad_header('"timeout_seconds" is required: a positive integer')
        job_id = payload.get("id") or ""
        if not isinstance(job_id, str):
            raise _bad_header('"id" must be a string')
        if job_id:
            check_job_id(job_id)  # it is logged and sent on: keep it plain
        job = cls(
            capability=capability,
            timeout_seconds=timeout,
            id=job_id,
            request=_json_object_string(payload.get("request"), "request"),
            parameters=_json_object_string(payload.get("parameters"), "parameters"),
        )
        job.orchestrators()  # refuse a malformed filter here, before any work
        return job

    def orchestrators(self) -> OrchestratorFilter:
        return OrchestratorFilter.parse(self.parameters.get("orchestrators"))

    def capped(self, max_timeout: int) -> JobRequest:
        """This job with ``timeout_seconds`` at most ``max_timeout``: a client must not hold
        capacity longer than the node allows."""
        return replace(self, timeout_seconds=min(self.timeout_seconds, max_timeout))

    def encode(self) -> str:
        """The header as go-livepeer writes it; standard JSON only (its decoder reads no NaN)."""
        payload = {
            "id": self.id,
            "request": json.dumps(self.request, allow_nan=False),
            "parameters": json.dumps(self.parameters, allow_nan=False),
            "capability": self.capability,
            "sender": OFFCHAIN_SENDER,
            "sig": "",
            "timeout_seconds": self.timeout_seconds,
        }
        return base64.b64encode(json.dumps(payload, allow_nan=False).encode()).decode()


def sender_header() -> str:
    """``Livepeer-Eth-Address`` for an off-chain gateway: zero address, empty signature."""
    return base64.b64encode(json.dumps({"addr": OFFCHAIN_SENDER, "sig": ""}).encode()).decode()


def check_sender_header(value: str | None) -> str:
    if not value:
        raise ApiError(400, "missing_sender", f"the {SENDER_HEADER} header is required")
    try:
        sender = loads_json(base64.b64decode(value, validate=True))
        addr = sender["addr"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise ApiError(
            400, "invalid_sender", f'{SENDER_HEADER} must be base64 of {{"addr": "0x...", "sig": ""}}'
        ) from None
    return str(addr)


# -- BYOC streaming (go-livepeer's /ai/stream routes; the README's "Live streams through the gateway")
# Gateway -> orchestrator: POST /ai/stream/start|update|stop with the Livepeer header (its "id" is
# the stream id; update and stop name it in "request": {"stream_id": ...}). The start's answer
# carries the orchestrator-hosted trickle channels' URLs in these headers, plus the stream's key
# (common.trickle.publisher.STREAM_KEY_HEADER), which update and stop must send back.
STREAM_START_PATH = "/ai/stream/start"
STREAM_UPDATE_PATH = "/ai/stream/update"
STREAM_STOP_PATH = "/ai/stream/stop"
TRICKLE_PREFIX = "/ai/trickle"
PUBLISH_URL_HEADER = "X-Publish-Url"  # input {id}: the gateway publishes, the container subscribes
SUBSCRIBE_URL_HEADER = "X-Subscribe-Url"  # output {id}-out: the container publishes, the gateway reads
CONTROL_URL_HEADER = "X-Control-Url"  # {id}-control: the gateway publishes
EVENTS_URL_HEADER = "X-Events-Url"  # {id}-events: the container publishes
DATA_URL_HEADER = "X-Data-Url"  # {id}-data: the container publishes JSON lines
# The event an orchestrator writes last on a stream's events channel, before closing its channels.
STREAM_ENDED_EVENT = "stream_ended"

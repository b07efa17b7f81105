"""go-livepeer's BYOC wire formats: the ``Livepeer`` job header, sender header and job token.

The header is standard base64 of a JSON object whose ``request`` and ``parameters`` are themselves
JSON-encoded strings (reference ``go-livepeer-byoc.md`` §1.1). Off-chain nothing is signed: the
sender is the zero address and ``sig`` is empty, which a go-livepeer orchestrator accepts.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from common.errors import ApiError
from common.names import check_model_id

JOB_HEADER = "Livepeer"
SENDER_HEADER = "Livepeer-Eth-Address"
CAPABILITY_HEADER = "Livepeer-Capability"
OFFCHAIN_SENDER = "0x0000000000000000000000000000000000000000"


def _bad_header(detail: str) -> ApiError:
    return ApiError(400, "invalid_livepeer_header", detail)


def _json_object_string(value: Any, key: str) -> dict[str, Any]:
    """``request`` and ``parameters`` carry a JSON object encoded as a string."""
    if value in (None, ""):
        return {}
    try:
        parsed = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise _bad_header(f'"{key}" must be a string holding a JSON object, such as "{{}}"')
    return parsed


@dataclass
class JobRequest:
    """The decoded ``Livepeer`` header of a request/response job."""

    capability: str
    timeout_seconds: int
    id: str = ""
    request: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def decode(cls, header: str) -> JobRequest:
        try:
            payload = json.loads(base64.b64decode(header, validate=True))
        except (binascii.Error, ValueError):
            raise _bad_header(
                "the Livepeer header must be base64 of a JSON object with capability and timeout_seconds"
            ) from None
        if not isinstance(payload, dict):
            raise _bad_header("the Livepeer header must hold a JSON object")
        capability = payload.get("capability")
        if not isinstance(capability, str) or not capability:
            raise _bad_header('the Livepeer header lacks "capability" (the model id)')
        check_model_id(capability, "the Livepeer header's capability")
        timeout = payload.get("timeout_seconds")
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
            raise _bad_header('"timeout_seconds" is required: a positive integer')
        return cls(
            capability=capability,
            timeout_seconds=timeout,
            id=str(payload.get("id") or ""),
            request=_json_object_string(payload.get("request"), "request"),
            parameters=_json_object_string(payload.get("parameters"), "parameters"),
        )

    def encode(self) -> str:
        payload = {
            "id": self.id,
            "request": json.dumps(self.request),
            "parameters": json.dumps(self.parameters),
            "capability": self.capability,
            "sender": OFFCHAIN_SENDER,
            "sig": "",
            "timeout_seconds": self.timeout_seconds,
        }
        return base64.b64encode(json.dumps(payload).encode()).decode()


def sender_header() -> str:
    """``Livepeer-Eth-Address`` for an off-chain gateway: zero address, empty signature."""
    return base64.b64encode(json.dumps({"addr": OFFCHAIN_SENDER, "sig": ""}).encode()).decode()


def check_sender_header(value: str | None) -> str:
    if not value:
        raise ApiError(400, "missing_sender", f"the {SENDER_HEADER} header is required")
    try:
        sender = json.loads(base64.b64decode(value, validate=True))
        addr = sender["addr"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise ApiError(
            400, "invalid_sender", f'{SENDER_HEADER} must be base64 of {{"addr": "0x...", "sig": ""}}'
        ) from None
    return str(addr)

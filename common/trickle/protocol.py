"""Wire constants shared by the trickle server and clients (go-livepeer's trickle semantics)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import httpx

from ..errors import ApiError

SEQ_HEADER = "Lp-Trickle-Seq"
LATEST_HEADER = "Lp-Trickle-Latest"
CLOSED_HEADER = "Lp-Trickle-Closed"
CLOSED_VALUE = "terminated"
PARAMS_HEADER = "X-Params"

STATUS_UNAVAILABLE = 470  # segment gone from the ring, or not reachable yet
SEQ_NEXT = -1  # the next segment to be written
SEQ_LATEST = -2  # the segment written last

MAX_JOB_ID_LENGTH = 128
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_job_id(job_id: str) -> str:
    """Job ids become URL path segments and log fields: keep them short and plain."""
    if len(job_id) > MAX_JOB_ID_LENGTH or ".." in job_id or not _JOB_ID.fullmatch(job_id):
        raise ApiError(
            400,
            "invalid_job_id",
            f"job id {job_id[:40]!r} is not allowed: use 1-{MAX_JOB_ID_LENGTH} characters from "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'",
        )
    return job_id


def params_json(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(params), separators=(",", ":"))


class TrickleError(Exception):
    """A trickle request the server refused; carries its JSON error when it sent one."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail

    @classmethod
    def from_response(cls, response: httpx.Response) -> TrickleError:
        try:
            body = response.json()
            return cls(response.status_code, str(body["error"]), str(body["detail"]))
        except (ValueError, KeyError, TypeError):
            return cls(response.status_code, "http_error", response.text[:300])

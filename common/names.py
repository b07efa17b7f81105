"""Names that travel in URLs, headers and log lines: model ids and job ids.

They enter from clients and containers and are written into outgoing request lines, headers and
logs, so each is checked where it enters against a small alphabet with no separators, no CR/LF
and no NUL: such a name cannot split a header, leave its path segment or forge a log line.
"""

from __future__ import annotations

import re

from .errors import ApiError

MAX_NAME_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _shown(value: str) -> str:
    return repr(value[:40]) + ("..." if len(value) > 40 else "")


def is_model_id(value: object) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_model_id(value: object, where: str = "model id") -> str:
    """A model id (capability name): 1-128 of ``A-Z a-z 0-9 . _ -``, else 400 ``invalid_model_id``."""
    if not is_model_id(value):
        shown = _shown(value) if isinstance(value, str) else type(value).__name__
        raise ApiError(
            400,
            "invalid_model_id",
            f"{where} {shown} is not allowed: use 1-{MAX_NAME_LENGTH} characters from A-Z a-z 0-9 . _ -",
        )
    assert isinstance(value, str)
    return value


def check_job_id(job_id: str) -> str:
    """Job ids become URL path segments and log fields: keep them short and plain."""
    if ".." in job_id or not _JOB_ID.fullmatch(job_id):
        raise ApiError(
            400,
            "invalid_job_id",
            f"job id {_shown(job_id)} is not allowed: use 1-{MAX_NAME_LENGTH} characters from "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'",
        )
    return job_id

"""Wire constants shared by the trickle server and clients (go-livepeer's trickle semantics)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from ..client import Answer

SEQ_HEADER = "Lp-Trickle-Seq"
LATEST_HEADER = "Lp-Trickle-Latest"
CLOSED_HEADER = "Lp-Trickle-Closed"
CLOSED_VALUE = "terminated"
RESET_HEADER = "Lp-Trickle-Reset"  # on a write: close every earlier segment of the channel
# On a 200 segment: the segment is an error report (its body is {"error", "detail"} JSON), so a
# reader keeps going; go-livepeer's and pytrickle's readers treat any other status as a fault.
ERROR_HEADER = "Lp-Trickle-Error"
# Ours, for frame-per-segment streams (each input segment answered by one output segment): on an
# orchestrator's start answer, "1" says a write to the stream's input that carries it with "1" is
# answered with the output of the same seq, so the gateway needs no output read per frame.
REPLY_HEADER = "Lp-Trickle-Reply"
# Ours as well, for the container's side of such a stream ("read_along": true in the start body
# the orchestrator sends it): a write to the output channel that carries READ_HEADER: n is
# answered with input segment n if that one is already whole at the server (answered as a read of
# it, plus WRITTEN_HEADER: the seq written), else as a plain write. A busy container, whose next
# input is waiting when an output goes out, so needs no input read per frame.
READ_HEADER = "Lp-Trickle-Read"
WRITTEN_HEADER = "Lp-Trickle-Written"
PARAMS_HEADER = "X-Params"

STATUS_UNAVAILABLE = 470  # segment gone from the ring, or not reachable yet
SEQ_NEXT = -1  # the next segment to be written
SEQ_LATEST = -2  # the segment written last
# How long a client keeps an idle pooled connection: under uvicorn's 5 s keep-alive, so a client
# never picks a connection as the server closes it. A pre-opened POST sent on such a connection
# is lost without an error until its body is written, and its segment is skipped.
KEEPALIVE_EXPIRY = 4.0


# A segment its writer sent with a Content-Length of at most this many bytes (a frame, an event,
# a whole-segment publisher's upload) goes to readers once it is whole, in one write with that
# length; longer or chunked ones are streamed as they arrive. Loopback carries a MiB in under a
# millisecond, so a reader waits about that; each chunk streamed costs both ends a write and the
# chunk framing (the gateway's frames came to its client chunked, read in Python by httpx).
WHOLE_SEGMENT_BYTES = 1024 * 1024


def header_int(text: str | None) -> int | None:
    """A header's non-negative integer of at most 18 ASCII digits, else None."""
    return int(text) if text is not None and text.isascii() and text.isdigit() and len(text) <= 18 else None


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
    def from_response(cls, response: httpx.Response | Answer) -> TrickleError:
        """Built from an answer whose body has been read."""
        try:
            body = json.loads(response.content)
            return cls(response.status_code, str(body["error"]), str(body["detail"]))
        except (ValueError, KeyError, TypeError):
            return cls(response.status_code, "http_error", response.content.decode("utf-8", "replace")[:300])

"""go-livepeer's trickle server over HTTP: channels of numbered segments, streamed both ways.

Routes, under a prefix (``/ai/trickle`` on an orchestrator):

- ``POST {ch}`` create (only with ``autocreate``; MIME from ``Expect-Content``), ``DELETE {ch}``
  close (readers finish, writers are refused);
- ``POST {ch}/{seq}`` write segment ``seq`` (``-1``: the next), its body streamed to readers as
  it arrives; ``Lp-Trickle-Reset`` closes every earlier segment; ours, ``Lp-Trickle-Reply: 1``
  on a channel whose segments each have an output (``Channel.replies``: an orchestrator's
  frame-per-segment input) answers the write with that output once it is there; ours too,
  ``Lp-Trickle-Read: n`` on the output of such a stream (``Channel.read_along``) answers it with
  input segment n when that one is already whole;
- ``GET {ch}/{seq}`` read (``-1`` the next, ``-2`` the latest): waits for the next segment's first
  byte, then streams (one written with a Content-Length of at most a MiB goes out once whole,
  with that length); ``GET {ch}/next`` the next seq to be written; ``DELETE {ch}/{seq}`` close one.

A read answers only 200, 404 or 470, as readers (go-livepeer's, pytrickle's) take any other
status for a broken connection: 200 with ``Lp-Trickle-Seq`` (and ``Lp-Trickle-Closed`` at the
end), 404 for no channel, 470 with ``Lp-Trickle-Latest`` for a segment gone or not near. Requests
that are malformed (a bad name or seq) or over a bound get the usual JSON 4xx.

Run alone (tests, benches): ``python -m common.trickle.server --port 8000 --autocreate``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ApiError
from ..http import unless_client_leaves
from ..service import service_app
from .channel import (
    Channel,
    ChannelFull,
    Channels,
    IncompleteSegment,
    SegmentTooLarge,
    valid_name,
)
from .protocol import (
    CLOSED_HEADER,
    CLOSED_VALUE,
    ERROR_HEADER,
    LATEST_HEADER,
    READ_HEADER,
    REPLY_HEADER,
    RESET_HEADER,
    SEQ_HEADER,
    SEQ_LATEST,
    SEQ_NEXT,
    STATUS_UNAVAILABLE,
    WHOLE_SEGMENT_BYTES,
    WRITTEN_HEADER,
    header_int,
)

log = logging.getLogger("trickle")

_SEQ = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only: int() also takes "١٢" and "1_0"
_ERROR_CODE = re.compile(r"[a-z0-9_]{1,64}")
_MIME = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}(;[ -~]{0,128})?")
# The longest a write that asked for its output waits for it (a container's time for one frame is
# milliseconds to seconds; the stream's own watchdogs end a container that stops answering).
REPLY_SECONDS = 30.0


def _shown(text: str) -> str:
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


def parse_seq(text: str, lowest: int = SEQ_LATEST) -> int:
    """A seq from a URL: an integer >= ``lowest`` of at most 18 digits, else 400 ``invalid_seq``."""
    if _SEQ.fullmatch(text) is None or int(text) < lowest:
        raise ApiError(
            400,
            "invalid_seq",
            f"a segment number is an integer >= {lowest} of 1-18 digits, got {_shown(text)}",
        )
    return int(text)


def check_name(name: str) -> str:
    if not valid_name(name):
        raise ApiError(
            400,
            "invalid_channel",
            f"channel name {_shown(name)} is not allowed: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "not starting with a dot",
        )
    return name


def _mime(request: Request) -> str:
    mime = request.headers.get("expect-content") or request.headers.get("content-type") or "video/mp2t"
    if _MIME.fullmatch(mime) is None:
        raise ApiError(
            400, "invalid_mime", f"Expect-Content must be a MIME type such as video/mp2t, got {_shown(mime)}"
        )
    return mime


class ChannelServer:
    """The channels and their routes; the in-process API is ``create``/``close``/``get``."""

    def __init__(
        self,
        *,
        autocreate: bool = False,
        max_channels: int = 256,
        max_segment_bytes: int = 32 * 1024 * 1024,
        max_writers: int = 1024,
        idle_seconds: float = 300.0,
        linger: float = 30.0,
    ) -> None:
        self.autocreate = autocreate
        self.max_writers = max_writers
        self.writers = 0  # open POST bodies, each holding a connection and a segment
        self.channels = Channels(
            max_channels=max_channels,
            max_segment_bytes=max_segment_bytes,
            idle_seconds=idle_seconds,
            linger=linger,
        )

    # -- in process -----------------------------------------------------------------------------

    def create(self, name: str, mime: str = "video/mp2t") -> Channel:
        try:
            return self.channels.create(check_name(name), mime)
        except ChannelFull as exc:
            raise ApiError(
                503,
                "too_many_channels",
                f"{exc}; close finished channels or retry later",
                {"Retry-After": "1"},
            ) from None

    def close(self, name: str) -> bool:
        return self.channels.close(name)

    def get(self, name: str) -> Channel | None:
        return self.channels.get(name)

    # -- HTTP -----------------------------------------------------------------------------------

    def routes(self, prefix: str = "") -> list[Route]:
        # GET and POST {channel}/{seq} are also dispatched by SegmentRoutes: change them together.
        prefix = prefix.rstrip("/")
        return [
            Route(f"{prefix}/{{channel}}/next", self.next_seq, methods=["GET"]),
            Route(f"{prefix}/{{channel}}/{{seq}}", self.read, methods=["GET"]),
            Route(f"{prefix}/{{channel}}/{{seq}}", self.write, methods=["POST"]),
            Route(f"{prefix}/{{channel}}/{{seq}}", self.drop, methods=["DELETE"]),
            Route(f"{prefix}/{{channel}}", self.create_channel, methods=["POST"]),
            Route(f"{prefix}/{{channel}}", self.delete_channel, methods=["DELETE"]),
        ]

    def _channel(self, request: Request) -> Channel:
        name = check_name(request.path_params["channel"])
        channel = self.channels.get(name)
        if channel is None:
            raise ApiError(404, "unknown_channel", f"no channel {name!r}: create it first")
        return channel

    async def read(self, request: Request) -> Response:
        channel = self._channel(request)
        return await serve_segment(request, channel, parse_seq(request.path_params["seq"]))

    async def write(self, request: Request) -> Response:
        name = check_name(request.path_params["channel"])
        seq = parse_seq(request.path_params["seq"], lowest=SEQ_NEXT)
        if self.writers >= self.max_writers:
            raise ApiError(
                503, "too_many_writers", f"{self.writers} segments are being written, the limit; retry later"
            )
        channel = self.channels.get(name)
        stream, first = request.stream(), b""
        if channel is None or channel.closed:
            refused = ApiError(404, "unknown_channel", f"no open channel {name!r}", {"Connection": "close"})
            if not self.autocreate:
                raise refused
            mime = _mime(request)
            if channel is not None:  # a closed one lingers: an empty write is its publisher's goodbye
                first = await anext(stream, b"")
                if not first:
                    return Response(b"", 200, headers={SEQ_HEADER: str(seq), CLOSED_HEADER: CLOSED_VALUE})
            channel = self.create(name, mime)
        return await self._fill(request, channel, seq, first, stream)

    async def _fill(
        self, request: Request, channel: Channel, seq: int, first: bytes, stream: AsyncIterator[bytes]
    ) -> Response:
        output = channel.replies if request.headers.get(REPLY_HEADER) == "1" else None
        read = _read_along(request, channel)
        # An input overrun in the ring before the container reads it is skipped, and the outputs
        # after it would answer the wrong frames: fewer frames await theirs than the ring holds.
        if output is not None and channel.awaiting_replies >= channel.ring_size - 1:
            raise ApiError(
                503,
                "too_many_frames",
                f"{channel.awaiting_replies} frames of {channel.name!r} await their output, the most "
                "its ring allows; send the next once one is answered",
                {"Retry-After": "1"},
            )
        self.writers += 1
        channel.awaiting_replies += output is not None
        try:
            try:
                answer = await receive_segment(request, channel, seq, first, stream)
            finally:
                self.writers -= 1
            if answer.status_code != 200 or (output is None and read is None):
                return answer
            written = int(answer.headers[SEQ_HEADER])
            segment = channel.get(written)
            if segment is None or segment.empty:  # a keepalive or a goodbye: no output, no input
                return answer
            if read is not None and channel.read_along is not None and CLOSED_HEADER not in answer.headers:
                return await _ride(request, channel.read_along, read, answer)
            if output is None:
                return answer
            return await _reply(request, channel, output, written)
        finally:
            channel.awaiting_replies -= output is not None

    async def next_seq(self, request: Request) -> Response:
        return next_seq_answer(self._channel(request))

    async def drop(self, request: Request) -> Response:
        channel = self._channel(request)
        seq = parse_seq(request.path_params["seq"], lowest=0)
        if not channel.drop(seq):
            raise ApiError(400, "unknown_segment", f"channel {channel.name!r} holds no segment {seq}")
        return JSONResponse({"channel": channel.name, "seq": seq, "closed": True})

    async def create_channel(self, request: Request) -> Response:
        name = check_name(request.path_params["channel"])
        channel = self.channels.get(name)
        if channel is None or channel.closed:
            if not self.autocreate:
                raise ApiError(
                    404, "unknown_channel", f"no channel {name!r}; this server creates none on request"
                )
            channel = self.create(name, _mime(request))
        return JSONResponse({"channel": channel.name, "mime": channel.mime, "next": channel.next_write})

    async def delete_channel(self, request: Request) -> Response:
        channel = self._channel(request)
        self.close(channel.name)
        return JSONResponse({"channel": channel.name, "closed": True, "segments": channel.next_write})


async def receive_segment(
    request: Request,
    channel: Channel,
    seq: int,
    first: bytes = b"",
    stream: AsyncIterator[bytes] | None = None,
) -> Response:
    """``POST {ch}/{seq}``: the request body written into ``channel`` as segment ``seq``, chunk by
    chunk as it arrives (readers stream it meanwhile); ``first`` is what was already read of it.

    The counterpart of :func:`serve_segment` for any :class:`Channel`, also one held outside a
    :class:`ChannelServer` (a gateway's own channels for a stream's client).
    """
    error = request.headers.get(ERROR_HEADER.lower())
    if error is not None and _ERROR_CODE.fullmatch(error) is None:
        raise ApiError(
            400, "invalid_header", f"{ERROR_HEADER} must be an error code such as processing_failed"
        )
    content_type = request.headers.get("content-type")
    if content_type is not None and _MIME.fullmatch(content_type) is None:
        raise ApiError(400, "invalid_mime", f"Content-Type must be a MIME type, got {_shown(content_type)}")
    segment = channel.open_write(seq, reset=RESET_HEADER.lower() in request.headers)
    segment.content_type = content_type  # each segment keeps its own (frames: image/jpeg, ...)
    segment.length = header_int(request.headers.get("content-length"))
    if error is not None:  # the writer reports a failure in band: readers get it and go on
        segment.error, segment.content_type = error, "application/json"
    try:
        segment.write(first)
        async for chunk in request.stream() if stream is None else stream:
            if segment.closed:  # reset, evicted or the channel closed: the rest goes nowhere
                break
            segment.write(chunk)
    except SegmentTooLarge as exc:
        channel.writer_broke_off(segment)
        raise ApiError(413, "payload_too_large", f"{exc}: send smaller segments") from None
    except ClientDisconnect:  # nobody is left to answer: one line, not a traceback
        channel.writer_broke_off(segment)
        log.info("channel %s seq %d: the writer left after %d bytes", channel.name, segment.seq, segment.size)
        return Response(b"", 400)
    except BaseException:
        channel.writer_broke_off(segment)
        raise
    segment.close()
    if not segment.empty:
        # A writer skipped a seq (its POST was lost before reaching us): readers parked on it
        # would wait for ever, so they go on; a seq still to come was opened before this one.
        channel.end_waits_before(segment.seq)
    headers = {SEQ_HEADER: str(segment.seq)}
    if channel.closed:
        headers[CLOSED_HEADER] = CLOSED_VALUE
    if segment.empty:
        headers["Connection"] = "close"
    return Response(b"", 200, headers=headers)


async def serve_segment(request: Request, channel: Channel, seq: int) -> Response:
    """``GET {ch}/{seq}``: the segment streamed as it is written (whole, if its writer announced a
    length of at most :data:`WHOLE_SEGMENT_BYTES`), or why not, as 200/470 only."""
    seq = channel.resolve(seq)
    segment = channel.for_read(seq)
    headers = {SEQ_HEADER: str(seq), LATEST_HEADER: str(channel.next_write)}
    if segment is None:
        # Past a gap (a seq its writer skipped) the 470 sends the reader on to the next segment
        # kept, not to the live edge past it; on a closed channel without one, that is the end.
        kept = channel.kept_after(seq)
        if channel.closed and kept is None:
            return Response(b"", 200, headers={**headers, CLOSED_HEADER: CLOSED_VALUE})
        if kept is not None:
            headers[LATEST_HEADER] = str(kept)
        raise ApiError(
            STATUS_UNAVAILABLE,
            "segment_unavailable",
            f"segment {seq} is neither one of the last {channel.ring_size} nor the next to be written; "
            f"read from Lp-Trickle-Latest={headers[LATEST_HEADER]}",
            headers,
        )
    if not segment.closed and segment.empty:
        await unless_client_leaves(request, segment.wait_started())
    if not segment.closed and segment.length is not None and segment.length <= WHOLE_SEGMENT_BYTES:
        await unless_client_leaves(request, segment.wait_closed())
    headers[LATEST_HEADER] = str(channel.next_write)
    if segment.error is not None:
        headers[ERROR_HEADER] = segment.error
    media_type = segment.content_type or channel.mime
    if segment.closed and segment.empty:
        # The end only if nothing was written after it: an empty segment the writer skipped
        # (closed once a later one was written) must not end a reader short of that later one.
        if channel.closed and channel.next_write <= seq + 1:
            headers[CLOSED_HEADER] = CLOSED_VALUE
        return Response(b"", 200, headers=headers, media_type=media_type)
    if (whole := segment.whole()) is not None:
        # Finished: sent whole with its length, in one write. Streamed, its bytes are framed as
        # chunks (copied once more) and followed by a second write, the last chunk.
        return Response(whole, headers=headers, media_type=media_type)
    return _SegmentStream(segment.chunks(), headers=headers, media_type=media_type)


def _read_along(request: Request, channel: Channel) -> int | None:
    """The input seq a write to ``channel`` asks for with READ_HEADER, if the channel offers it."""
    text = request.headers.get(READ_HEADER.lower())
    if text is None or channel.read_along is None:
        return None
    if (seq := header_int(text)) is None:
        raise ApiError(400, "invalid_header", f"{READ_HEADER} must be a segment number, got {_shown(text)}")
    return seq


async def _ride(request: Request, channel: Channel, seq: int, written: Response) -> Response:
    """The answer to a write that asked for ``channel``'s segment ``seq``: that segment, served as
    a read of it would be, if it is whole now; else the write's own answer. It never waits, so a
    write is never held up by an input still to come; its writer reads that one as usual."""
    segment = channel.get(seq)
    if segment is None or not segment.claimed or not segment.closed or segment.failed:
        return written
    answer = await serve_segment(request, channel, seq)
    answer.headers[WRITTEN_HEADER] = written.headers[SEQ_HEADER]
    return answer


async def _reply(request: Request, channel: Channel, output: Channel, seq: int) -> Response:
    """The answer to a write of ``channel``'s segment ``seq`` that asked for its output: ``output``'s
    segment ``seq``, served as a read of it would be, once the container has written it.

    Output ``n`` answers input ``n`` while every input before it reached the container whole: it
    skips one cut off, so from there on the outputs are one place early, and a write asking for
    its output is refused rather than answered with another frame's.
    """
    if channel.first_cut_off is not None and channel.first_cut_off < seq:
        raise ApiError(
            409,
            "reply_unavailable",
            f"input segment {channel.first_cut_off} of {channel.name!r} was cut off, so later outputs "
            "no longer match their inputs; restart the stream",
        )

    async def reachable() -> None:
        while output.next_write < seq and not output.closed:
            await output.wait_change()

    try:
        async with asyncio.timeout(REPLY_SECONDS):
            await unless_client_leaves(request, reachable())
            return await serve_segment(request, output, seq)
    except TimeoutError:
        raise ApiError(
            504, "reply_timeout", f"no output {seq} on {output.name!r} within {REPLY_SECONDS:g} s"
        ) from None


def next_seq_answer(channel: Channel) -> Response:
    """``GET {ch}/next``: the seq the next write gets, in the body and ``Lp-Trickle-Latest``."""
    headers = {LATEST_HEADER: str(channel.next_write)}
    if channel.closed:
        headers[CLOSED_HEADER] = CLOSED_VALUE
    return Response(str(channel.next_write), 200, headers=headers, media_type="text/plain")


class _SegmentStream(StreamingResponse):
    """A segment's bytes as they arrive; if its writer broke off, the transfer is cut short (no
    final chunk), the one way HTTP has to tell a reader that what it got is not the whole.

    Sent without StreamingResponse's watch for a reader that leaves: a task group per response,
    torn down with a repr of its task. With it this server cost about twice the CPU of a bare
    uvicorn app per 250 KB segment written and read, without it 1.5 times
    (``bench/bench_trickle.py``). A reader that leaves mid-segment is served no longer than the
    segment's writer takes, which the writer's own body idle deadline bounds; the bytes meant for
    it go nowhere (uvicorn drops what is sent on a closed connection).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except IncompleteSegment as exc:
            log.info("%s: %s; the reader's transfer is cut short", scope["path"][:200], exc)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class SegmentRoutes:
    """ASGI middleware: ``GET`` and ``POST {prefix}/{channel}/{seq}`` straight to a
    :class:`ChannelServer`, past Starlette's exception middleware and router; every other request
    goes on to ``app``.

    A live stream crosses these two routes four times per segment at an orchestrator; this way the
    orchestrator's CPU per ``/live`` frame was 0.93 of the routed way's (``bench/bench_compare.py``,
    20 rounds, 2026-12-04). Installed
    inside :class:`common.errors.CatchAll` (see ``service_app``'s ``inner``), so an unexpected
    exception is still a JSON 500; an :class:`ApiError` is answered here as the app would.
    """

    def __init__(self, app: ASGIApp, server: ChannelServer, prefix: str) -> None:
        self.app = app
        self.server = server
        self.prefix = prefix.rstrip("/") + "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in ("GET", "POST")
            and scope["path"].startswith(self.prefix)
        ):
            name, _, seq = scope["path"][len(self.prefix) :].partition("/")
            if name and seq and "/" not in seq and seq != "next":  # Starlette's {channel}/{seq}
                scope["path_params"] = {"channel": name, "seq": seq}
                request = Request(scope, receive, send)
                try:
                    if scope["method"] == "GET":
                        response = await self.server.read(request)
                    else:
                        response = await self.server.write(request)
                except ApiError as exc:
                    response = exc.response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def channel_app(server: ChannelServer, prefix: str = "") -> Starlette:
    """A stand-alone trickle server: ``server``'s routes under ``prefix``, ``GET /health``, the sweep."""

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "IDLE", "channels": len(server.channels)})

    return service_app(
        [Route("/health", health, methods=["GET"]), *server.routes(prefix)],
        lambda: [server.channels.sweep_forever()],
    )


def main(argv: list[str] | None = None) -> None:
    from ..server import serve  # uvicorn and its limits: only when run as a server

    parser = argparse.ArgumentParser(description="A go-livepeer-compatible trickle server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefix", default="", help="path the channels live under, e.g. /ai/trickle")
    parser.add_argument("--autocreate", action="store_true", help="create a channel on its first write")
    parser.add_argument("--max-channels", type=int, default=256)
    parser.add_argument("--max-segment-bytes", type=int, default=32 * 1024 * 1024)
    parser.add_argument(
        "--idle-seconds", type=float, default=300.0, help="sweep channels with no write this long"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = ChannelServer(
        autocreate=args.autocreate,
        max_channels=args.max_channels,
        max_segment_bytes=args.max_segment_bytes,
        idle_seconds=args.idle_seconds,
    )
    serve(channel_app(server, args.prefix), args.host, args.port)


if __name__ == "__main__":
    main()

"""Client side, writing: segments to a trickle channel as ``POST {url}/{seq}``, seq 0, 1, 2, ...

As go-livepeer's publisher does, the POST for segment n+1 is opened (headers sent, body pending)
as soon as segment n starts, so the next segment's first bytes go out with no connection set-up.
The server numbers a segment from its URL, so the two POSTs may reach it in either order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

import httpx

from ..client import Answer, stream
from .protocol import CLOSED_HEADER, READ_HEADER, WRITTEN_HEADER, TrickleError

# A node (gateway or orchestrator) gives the client that opens a stream a key in this header on
# the answer to its first write; every later request of that stream must carry it, or the node
# answers 404 as for a stream that does not exist. A container or a channel server issues none.
STREAM_KEY_HEADER = "Lp-Stream-Key"
_QUEUED_CHUNKS = 16  # a segment's chunks waiting for the socket: the writer waits beyond this
MAX_ANSWER_BYTES = 64 * 1024  # an answer to a write is empty or a small JSON error; more is not read


class StreamKey:
    """The key of one stream, shared by its publisher and subscriber: learnt from the answer that
    opened the stream, sent with every request after it."""

    def __init__(self, value: str | None = None) -> None:
        self.value = value

    def headers(self) -> dict[str, str]:
        return {STREAM_KEY_HEADER: self.value} if self.value else {}

    def learn(self, response: Answer) -> None:
        if self.value is None and (value := response.headers.get(STREAM_KEY_HEADER)):
            self.value = value


async def _post(
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    body: AsyncIterator[bytes] | bytes,
    timeout: float,
    *,
    may_carry_segment: bool = False,
) -> Answer:
    """The POST sent and its answer read: a trickle server answers a write with a few bytes, or,
    asked for it (``READ_HEADER``, then ``may_carry_segment``), with a segment of another channel
    (``WRITTEN_HEADER``), whose body is left for the caller."""
    answer = await stream(client, "POST", url, headers=headers, content=body, timeout=timeout)
    if not (may_carry_segment and WRITTEN_HEADER in answer.headers):
        await answer.aread(MAX_ANSWER_BYTES)
    return answer


def _check(answer: Answer, seq: int) -> Answer:
    """A segment's answer, raised as :class:`TrickleError` unless it is a plain 200."""
    if answer.headers.get(CLOSED_HEADER):
        raise TrickleError(answer.status_code, "stream_closed", f"segment {seq}: the channel is closed")
    if answer.status_code != 200:
        raise TrickleError.from_response(answer)
    return answer


def _retrieve(task: asyncio.Task[Answer]) -> None:
    """Mark a POST's outcome as seen: an abandoned one must not warn at garbage collection."""
    if not task.cancelled():
        task.exception()


class _Post:
    """One segment's POST: a chunked request body fed from a bounded queue as the segment is written."""

    def __init__(
        self, client: httpx.AsyncClient, url: str, headers: Mapping[str, str], timeout: float, seq: int
    ):
        self.seq = seq
        self.fed = 0  # bytes the writer handed over: once non-zero, this POST is never sent again
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUED_CHUNKS)
        self._timeout = timeout
        self.task = asyncio.create_task(
            _post(client, url, headers, self._body(), timeout), name=f"POST {url}"
        )
        self.task.add_done_callback(_retrieve)

    async def _body(self) -> AsyncIterator[bytes]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    def stale(self) -> bool:
        """Ended before any byte was handed to it (a lost idle connection, a server's body
        timeout): no byte of the segment went out, so it is safe to open again."""
        return self.fed == 0 and self.task.done()

    async def feed(self, chunk: bytes | None) -> None:
        """Queue ``chunk`` for the body (``None`` ends it); fails at once if the POST has ended."""
        if self.task.done():
            self._outcome()  # raises: a POST cannot end before its body does
        self.fed += len(chunk or b"")
        try:
            self._queue.put_nowait(chunk)
            return
        except asyncio.QueueFull:
            pass
        put = asyncio.ensure_future(self._queue.put(chunk))
        done, _ = await asyncio.wait(
            {put, self.task}, timeout=self._timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if put in done:
            return
        put.cancel()
        if self.task.done():
            self._outcome()
        raise TimeoutError(f"segment {self.seq}: the server took no bytes for {self._timeout} s")

    def _outcome(self) -> Answer:
        """The answer of a finished POST, raised as :class:`TrickleError` unless it is a plain 200."""
        return _check(self.task.result(), self.seq)  # a transport error raises here, as it is

    async def finish(self) -> Answer:
        await self.feed(None)
        try:
            await asyncio.wait_for(asyncio.shield(self.task), self._timeout)
        except TimeoutError:
            self.task.cancel()
            raise TimeoutError(f"segment {self.seq}: no answer within {self._timeout} s") from None
        return self._outcome()

    def abort(self) -> None:
        """Cut the body off mid-way: the server sees an incomplete upload, never a short segment."""
        self.task.cancel()


class SegmentWriter:
    """The open segment of a :class:`TricklePublisher`; its bytes go out as they are written."""

    def __init__(self, post: _Post) -> None:
        self._post = post
        self.seq = post.seq

    async def write(self, data: bytes) -> None:
        """Send ``data``; waits (at most the publisher's timeout) while the connection is full."""
        if data:
            await self._post.feed(bytes(data))


class TricklePublisher:
    """Writes segments ``POST {url}/0``, ``/1``, ... to one channel, each streamed as it is written.

    A segment whose POST fails (an error answer, a lost connection) raises in the writer and is
    not sent again: bytes may have reached the server, and a repeat would show readers the segment
    twice. The next segment still goes out with the next seq. Only a pre-opened POST that failed
    before any byte was handed to it is opened again.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        content_type: str = "video/mp2t",
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        key: StreamKey | None = None,
        preopen: bool = True,
    ) -> None:
        self.client = client
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": content_type, **(headers or {})}
        # On a node, the first answer brings the stream's key; until then nothing is pre-opened,
        # as a request without the key would be refused.
        self.key = key
        # Off for a writer whose segments carry headers of their own (a content type, an error
        # report): a pre-opened POST has sent its headers before its segment is known.
        self.preopen = preopen
        self.next_seq = 0
        self._pending: _Post | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    def _headers(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        return {**self.headers, **(headers or {}), **(self.key.headers() if self.key else {})}

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise TrickleError(0, "publisher_closed", f"{self.url}: the publisher is closed")

    def _open(self, seq: int, headers: Mapping[str, str] | None = None) -> _Post:
        return _Post(self.client, f"{self.url}/{seq}", self._headers(headers), self.timeout, seq)

    def _take(self, headers: Mapping[str, str] | None) -> _Post:
        post, self._pending = self._pending, None
        if post is None or post.stale():
            post = self._open(self.next_seq, headers)
        if self.preopen and (self.key is None or self.key.value is not None):
            self._pending = self._open(post.seq + 1)
        self.next_seq = post.seq + 1
        return post

    @contextlib.asynccontextmanager
    async def segment(self, headers: Mapping[str, str] | None = None) -> AsyncIterator[SegmentWriter]:
        """One segment, streamed: ``async with pub.segment() as seg: await seg.write(chunk)``.

        Leaving the block ends the segment and waits for its answer; an exception in the block
        cuts the upload off instead, so the server never takes a partial segment for a whole one.
        ``headers`` (e.g. this segment's ``Content-Type``) need a publisher made with
        ``preopen=False``.
        """
        if headers and self.preopen:
            raise ValueError("headers of a segment's own need TricklePublisher(preopen=False)")
        async with self._lock:
            self._refuse_if_closed()
            post = self._take(headers)
            try:
                yield SegmentWriter(post)
            except BaseException:
                post.abort()
                raise
            response = await post.finish()
            if self.key is not None:
                self.key.learn(response)

    async def write(self, data: bytes, headers: Mapping[str, str] | None = None) -> int:
        """Send ``data`` as one whole segment (with ``headers`` of its own, see :meth:`segment`);
        returns its seq. Without pre-opening, it goes as one plain POST with its length."""
        if self.preopen:
            async with self.segment(headers) as segment:
                await segment.write(data)
            return segment.seq
        seq, _ = await self._write_whole(data, headers)
        return seq

    async def write_reading(
        self, data: bytes, headers: Mapping[str, str] | None, read_seq: int
    ) -> Answer | None:
        """:meth:`write`, asking the server to answer with segment ``read_seq`` of the channel it
        pairs with this one (``READ_HEADER``; a publisher made with ``preopen=False``).

        Returns that answer, its body unread, for ``TrickleSubscriber.next(first=...)``; or None
        when the server had no whole segment ``read_seq`` to give (the segment is written either way).
        """
        _, answer = await self._write_whole(data, {**(headers or {}), READ_HEADER: str(read_seq)})
        if WRITTEN_HEADER in answer.headers:
            return answer
        await answer.aclose()
        return None

    async def _write_whole(self, data: bytes, headers: Mapping[str, str] | None) -> tuple[int, Answer]:
        """One plain POST of a whole segment with its length: the server has it whole in one read,
        and can hand it on whole (see ``serve_segment``). The answer's body is left unread when it
        is a segment of another channel (``WRITTEN_HEADER``)."""
        async with self._lock:
            self._refuse_if_closed()
            seq, self.next_seq = self.next_seq, self.next_seq + 1
            url, body = f"{self.url}/{seq}", bytes(data)
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await _post(
                        self.client, url, self._headers(headers), body, self.timeout, may_carry_segment=True
                    )
                    if WRITTEN_HEADER not in answer.headers:
                        _check(answer, seq)
            except TimeoutError:
                raise TimeoutError(f"segment {seq}: no answer within {self.timeout} s") from None
            if self.key is not None:
                self.key.learn(answer)
        return seq, answer

    async def close(self) -> None:
        """``DELETE {url}`` (end of stream), then end the pre-opened POST with no bytes.

        That empty POST is how go-livepeer's publisher ends too; a server adds no segment for it.
        """
        if self._closed:
            return
        self._closed = True
        try:
            response = await self.client.delete(
                self.url, headers=self.key.headers() if self.key else {}, timeout=self.timeout
            )
        finally:
            if (pending := self._pending) is not None:
                self._pending = None
                with contextlib.suppress(httpx.HTTPError, TrickleError, TimeoutError):
                    await pending.finish()
        # 404 (a container) or 400 (go-livepeer) for a channel already gone: closed either way.
        if response.status_code >= 400 and response.status_code not in (400, 404):
            raise TrickleError.from_response(response)

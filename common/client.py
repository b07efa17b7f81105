"""The HTTP client every component uses: httpx's API on aiohttp's connection pool and parser.

httpx on its default transport (httpcore, h11 and anyio, all pure Python) cost the node more CPU
than anything else it does; aiohttp parses and buffers in C. Relaying a 250 KB JPEG through one
Starlette hop on this host (``bench/bench_client.py`` in make bench, 2026-12-03 12:28 UTC, the
README's figures): httpx on its own transport 1.06 ms of CPU per job, httpx on this transport
0.74 ms, aiohttp alone 0.47 ms. This keeps httpx's requests, responses, timeouts and exceptions
for the callers, so nothing else changes, and has aiohttp do the HTTP: framing, header checks
(CR, LF and NUL refused), keep-alive. The hot paths skip httpx's models as well, on the same
session: job bodies (:func:`session_of`) and trickle segments (:func:`stream`).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import StreamWriter
from yarl import URL

# aiohttp reads ahead of its reader up to twice this per connection. At 256 KB a busy container's
# stream connections read megabytes ahead under CPU contention, and its heap kept that high-water
# mark (6.6 MB more per 720p stream in test_finished_streams_leave_no_memory_or_threads_behind);
# at aiohttp's own 64 KB it stays flat.
READ_BUFFER_BYTES = 64 * 1024


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _chunks(self._response, lambda: self._request)

    async def aclose(self) -> None:
        # Back to the pool when the body was read to its end, closed otherwise (aiohttp decides).
        self._response.release()


class _HeadFirst(aiohttp.payload.AsyncIterablePayload):
    """A streamed request body whose head goes out at once, as on httpx's own transport.

    aiohttp holds a request's head back until the body's first bytes, to send both in one write.
    A trickle publisher opens the POST for the next segment before that segment exists
    (go-livepeer's preconnect); held back, its head would meet the server's head timeout (10 s)
    on any channel written less often than that, such as a control channel's keepalive.
    """

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        if isinstance(writer, StreamWriter):
            writer.send_headers()
            await writer.drain()
        await super().write_with_length(writer, content_length)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends each request with one shared :class:`aiohttp.ClientSession`.

    httpx's timeouts map onto aiohttp's: ``connect`` and ``pool`` bound getting a connection,
    ``read`` (or ``write``, if longer) bounds each wait for bytes from the peer; a peer that stops
    reading the body never answers either, so the read timeout ends that wait too. aiohttp never
    sends a POST twice; it retries GET, PUT or DELETE once when a pooled connection turns out to be
    closed before any answer, as RFC 9112 allows for idempotent requests.
    """

    def __init__(
        self,
        limits: httpx.Limits,
        verify: bool | ssl.SSLContext = True,
        resolver: Callable[[], AbstractResolver] | None = None,
    ) -> None:
        self._limits = limits
        self._ssl: bool | ssl.SSLContext = verify
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session every request goes through; callers on a hot path may use it
        directly (see :func:`session_of`)."""
        if self._session is None:  # made on first use: aiohttp binds it to the running loop
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                limit_per_host=0,
                keepalive_timeout=self._limits.keepalive_expiry or 0,
                ssl=self._ssl,
                resolver=self._resolver() if self._resolver is not None else None,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,  # httpx decodes, as it would on its own transport
                read_bufsize=READ_BUFFER_BYTES,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        connect = _sum(timeout.get("connect"), timeout.get("pool"))
        read = _max(timeout.get("read"), timeout.get("write"))
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        # aiohttp frames the body itself: chunked for a stream without a length.
        headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        body: bytes | _HeadFirst | None
        try:
            body = request.content or None
        except httpx.RequestNotRead:  # an AsyncClient's streamed body
            if not isinstance(request.stream, httpx.AsyncByteStream):
                raise TypeError("an async transport takes an async request body") from None
            body = _HeadFirst(request.stream)
        response = await _send(
            self.session(),
            request.method,
            URL(str(request.url), encoded=True),  # already encoded by httpx: sent as it is
            headers,
            body,
            connect,
            read,
            lambda: request,
        )
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def new_client(
    timeout: httpx.Timeout,
    limits: httpx.Limits,
    verify: bool | ssl.SSLContext = True,
    resolver: Callable[[], AbstractResolver] | None = None,
) -> httpx.AsyncClient:
    """An httpx client on :class:`AiohttpTransport` that follows no redirects; ``resolver``
    makes the resolver its connections look host names up with (aiohttp's by default)."""
    return httpx.AsyncClient(
        transport=AiohttpTransport(limits, verify, resolver), timeout=timeout, follow_redirects=False
    )


class Answer:
    """A streamed answer from :func:`stream`: status and headers at once, the body as it comes.

    Read it (:meth:`aiter_bytes`, :meth:`aread`) or :meth:`aclose` it; reading it to the end, or
    failing to, closes it. Its failures are httpx's exceptions, on either kind of client.
    """

    def __init__(
        self,
        status_code: int,
        headers: Mapping[str, str],
        chunks: AsyncIterator[bytes],
        close: Callable[[], Awaitable[None]],
    ) -> None:
        self.status_code = status_code
        self.headers = headers  # case-insensitive
        self.content = b""  # what aread() read
        self._chunks = chunks
        self._close = close

    @classmethod
    def of(cls, response: httpx.Response) -> Answer:
        """An httpx response opened with ``stream=True``, as an answer."""
        return cls(response.status_code, response.headers, response.aiter_bytes(), response.aclose)

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks:
                yield chunk
        finally:
            await self.aclose()

    async def aread(self, limit: int | None = None) -> bytes:
        """The body, or its first ``limit`` bytes (the rest unread); the answer is closed after."""
        body = bytearray()
        try:
            async for chunk in self._chunks:
                body += chunk if limit is None else chunk[: limit - len(body)]
                if limit is not None and len(body) >= limit:
                    break
        finally:
            await self.aclose()
        self.content = bytes(body)
        return self.content

    async def aclose(self) -> None:
        await self._close()


async def stream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    content: AsyncIterator[bytes] | bytes | None = None,
    timeout: float,
) -> Answer:
    """One request, its answer streamed: with a client from :func:`new_client`, straight through
    its aiohttp session; with any other, through ``client.send``. ``headers`` go with the
    client's own.

    A trickle client sends a request per segment and reads each answer as it comes. Through
    httpx (its request and response models, its auth, redirect and cookie layers) a trickle
    publisher and subscriber on one client cost 2.2 to 2.4 times the CPU of aiohttp alone sending
    the same two requests per 250 KB segment; this way, 1.5 times (``bench/bench_trickle.py``).
    """
    transport = client._transport  # httpx has no public accessor for its transport
    if not isinstance(transport, AiohttpTransport):
        sent_request = client.build_request(method, url, headers=headers, content=content, timeout=timeout)
        return Answer.of(await client.send(sent_request, stream=True))

    def request() -> httpx.Request:  # for an exception only: httpx's carry the request
        return httpx.Request(method, url)

    sent = {name: value for name, value in client.headers.items() if name != "accept-encoding"}
    sent.update(headers)  # no accept-encoding: bodies are passed on as they come, undecoded
    body = _HeadFirst(content) if content is not None and not isinstance(content, bytes) else content
    response = await _send(transport.session(), method, url, sent, body, timeout, timeout, request)

    async def close() -> None:
        response.release()  # back to the pool when read to its end, closed otherwise

    return Answer(response.status, response.headers, _chunks(response, request), close)


async def _send(
    session: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    headers: Mapping[str, str] | list[tuple[str, str]],
    body: bytes | _HeadFirst | None,
    connect: float | None,
    read: float | None,
    request: Callable[[], httpx.Request],
) -> aiohttp.ClientResponse:
    """One request on ``session``, no redirect followed: ``connect`` bounds getting a connection,
    ``read`` each wait for bytes; failures as httpx's exceptions carrying ``request()``."""
    with _as_httpx_errors(request):
        return await session.request(
            method,
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
            compress=None,
            timeout=aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read),
        )


async def _chunks(
    response: aiohttp.ClientResponse, request: Callable[[], httpx.Request]
) -> AsyncIterator[bytes]:
    """An answer's body as it comes; failures as httpx's exceptions carrying ``request()``."""
    with _as_httpx_errors(request):
        async for chunk in response.content.iter_any():
            yield chunk


def session_of(client: httpx.AsyncClient) -> aiohttp.ClientSession:
    """The aiohttp session under a client from :func:`new_client`, for the calls that carry job
    bodies: httpx's own work per request (cookies, URL merging, header models) is a third of the
    CPU a relayed job costs on this transport (``bench/bench_client.py``). One pool serves both."""
    transport = client._transport  # httpx has no public accessor for its transport
    if not isinstance(transport, AiohttpTransport):
        raise TypeError("the client was not made by common.client.new_client")
    return transport.session()


def _sum(*values: float | None) -> float | None:
    given = [v for v in values if v is not None]
    return sum(given) if given else None


def _max(*values: float | None) -> float | None:
    given = [v for v in values if v is not None]
    return max(given) if given else None


# What aiohttp raises of its own: the connection's, the peer's (its parser's errors, such as a
# response cut short), a timeout; never what a request's body raised.
_NOT_THE_BODYS_OWN = (OSError, aiohttp.ClientError, TimeoutError, HttpProcessingError)


def body_failure(exc: BaseException) -> Exception | None:
    """What a request's own body raised, when that is what ended the request.

    aiohttp reports an exception from a body it is sending (a client's upload cut off, too
    large) as a connection error caused by it; httpx's own transport lets it through as it is,
    and callers answer it for what it is (a 413, a client that left), not as a peer's failure.
    """
    cause = exc.__cause__
    if isinstance(cause, Exception) and not isinstance(cause, _NOT_THE_BODYS_OWN):
        return cause
    return None


@contextmanager
def _as_httpx_errors(request: Callable[[], httpx.Request]) -> Iterator[None]:
    """aiohttp's failures as the httpx exceptions httpx's own transport raises for them, each
    carrying ``request()``."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request()) from exc
    except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out", request=request()) from exc
    except aiohttp.ClientError as exc:
        if (own := body_failure(exc)) is not None:
            raise own from None
        raise _httpx_error(exc, request()) from exc
    except ValueError as exc:  # a header value aiohttp refuses to send (CR, LF, NUL)
        raise httpx.LocalProtocolError(str(exc), request=request()) from exc


_PEER_BROKE_PROTOCOL = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientResponseError,
)


def _httpx_error(exc: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if isinstance(exc, _PEER_BROKE_PROTOCOL):
        return httpx.RemoteProtocolError(message, request=request)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(message, request=request)
    return httpx.ReadError(message, request=request)  # resets, broken pipes

"""A lean HTTP/1.1 transport for httpx: asyncio streams and httptools' C parser.

Why: the node relays megabyte-sized frames on every hop, and httpx's default stack (httpcore,
h11, anyio) spends about 7 ms of CPU per PUT+GET of a 320 KB frame on these hosts; the same
exchange over asyncio streams with the llhttp parser (httptools, which uvicorn already uses)
costs about 1 ms. It plugs in under ``httpx.AsyncClient(transport=...)``, so callers keep
httpx's API, timeouts and errors. Plain ``http://`` with keep-alive only; anything else (TLS to a
go-livepeer orchestrator) goes through httpx's own transport.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httptools
import httpx

_READ_SIZE = 256 * 1024


# Servers close idle keep-alive connections (uvicorn after 5 s); reusing one that is about to
# close fails a request whose body cannot be sent again, so idle connections retire earlier.
_MAX_IDLE_SECONDS = 4.0


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def reusable(self, now: float) -> bool:
        return now - self.idle_since < _MAX_IDLE_SECONDS and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class _Message:
    """httptools callbacks: collects one response's head and body chunks."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.chunks: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Exchange:
    """One request/response on a connection: reads until the head, then streams the body."""

    def __init__(self, connection: _Connection, read_timeout: float | None) -> None:
        self.connection = connection
        self.read_timeout = read_timeout
        self.message = _Message()
        self.parser = httptools.HttpResponseParser(self.message)

    async def _feed(self) -> None:
        try:
            data = await asyncio.wait_for(self.connection.reader.read(_READ_SIZE), self.read_timeout)
        except asyncio.TimeoutError:
            raise httpx.ReadTimeout("no data from the server in time") from None
        except OSError as exc:
            raise httpx.ReadError(str(exc)) from exc
        if not data:
            raise httpx.RemoteProtocolError("the server closed the connection mid-response")
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise httpx.RemoteProtocolError(f"malformed response: {exc}") from exc

    def keep_alive(self) -> bool:
        # Decided from the head: llhttp's own flag is not reliable once the message completed.
        connection = next((v for n, v in self.message.headers if n.lower() == b"connection"), b"")
        return self.parser.get_http_version() == "1.1" and connection.lower() != b"close"

    async def read_head(self) -> int:
        while True:
            while not self.message.head_done:
                await self._feed()
            status = self.parser.get_status_code()
            if status >= 200:
                return status
            # 1xx (go-livepeer's trickle server sends 100 Continue as a keepalive): skip it.
            while not self.message.complete:
                await self._feed()
            self.message = _Message()
            self.parser = httptools.HttpResponseParser(self.message)

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            if self.message.chunks:
                chunks, self.message.chunks = self.message.chunks, []
                for chunk in chunks:
                    yield chunk
            if self.message.complete:
                return
            await self._feed()


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, exchange: _Exchange, transport: Http11Transport, key: tuple[str, int]) -> None:
        self.exchange = exchange
        self.transport = transport
        self.key = key
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.exchange.body():
            yield chunk

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        exchange = self.exchange
        if exchange.message.complete and exchange.keep_alive():
            self.transport.release(self.key, exchange.connection)
        else:
            exchange.connection.close()


class Http11Transport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 over asyncio streams; ``https://`` falls back to httpx's transport."""

    def __init__(self, max_idle_per_host: int = 64) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._max_idle = max_idle_per_host
        self._fallback = httpx.AsyncHTTPTransport(verify=False)

    def release(self, key: tuple[str, int], connection: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self._max_idle:
            connection.idle_since = time.monotonic()
            idle.append(connection)
        else:
            connection.close()

    def _checkout(self, key: tuple[str, int]) -> _Connection | None:
        idle, now = self._idle.get(key, []), time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.reusable(now):
                return connection
            connection.close()
        return None

    async def _connect(self, key: tuple[str, int], timeout: float | None) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*key), timeout)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {key[0]}:{key[1]} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc}") from exc
        return _Connection(reader, writer)

    async def _send(self, connection: _Connection, request: httpx.Request) -> None:
        target = request.url.raw_path.decode("ascii")
        lines = [f"{request.method} {target} HTTP/1.1".encode()]
        lines += [name + b": " + value for name, value in request.headers.raw]
        connection.writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for chunk in request.stream:
            if chunked:
                if chunk:
                    connection.writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                connection.writer.write(chunk)
            await connection.writer.drain()
        if chunked:
            connection.writer.write(b"0\r\n\r\n")
        await connection.writer.drain()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            return await self._fallback.handle_async_request(request)
        key = (request.url.host, request.url.port or 80)
        timeouts = request.extensions.get("timeout", {})
        # A pooled connection may still have been closed by the server: then retry once on a
        # fresh one, which is safe only when the body can be sent again.
        replayable = isinstance(request.stream, httpx.ByteStream)
        connection = self._checkout(key)
        for fresh in (connection is None, True):
            if fresh:
                connection = await self._connect(key, timeouts.get("connect"))
            assert connection is not None
            exchange = _Exchange(connection, timeouts.get("read"))
            try:
                await self._send(connection, request)
                status = await exchange.read_head()
                break
            except (httpx.RemoteProtocolError, httpx.ReadError, OSError) as exc:
                connection.close()
                if fresh or not replayable:
                    if isinstance(exc, OSError):
                        raise httpx.WriteError(str(exc)) from exc
                    raise
            except BaseException:
                connection.close()
                raise
        return httpx.Response(
            status,
            headers=exchange.message.headers,
            stream=_ResponseStream(exchange, self, key),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        await self._fallback.aclose()

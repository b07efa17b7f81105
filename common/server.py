"""Run an ASGI app under uvicorn with the deadlines and the connection cap uvicorn lacks.

uvicorn closes idle keep-alive connections, but it has no deadline for a request head and none
for a request body: a client that sends half a request line, or a ``Content-Length`` of 1000
and then 10 bytes, holds a connection (and a file handle) forever, and enough of them exhaust
the process's file handles so that every client fails with nothing logged. Parsing stays in
httptools (uvicorn's own protocol class); :class:`LimitedHttpToolsProtocol` only adds timers
and a count:

- the request head (request line and headers) must be complete ``header_timeout`` seconds after
  the connection opened or the previous response ended, else 408 ``header_timeout`` and close
  (a keep-alive connection that stays silent is uvicorn's ``timeout_keep_alive`` to close; its
  first bytes after that long a pause start the deadline);
- a request body may stall at most ``body_idle_timeout`` seconds between chunks (time in which
  the server itself is not reading does not count), else 408 ``body_timeout`` (or a plain close
  once a response has started) and the app sees a disconnect;
- a client that takes no byte of an answer for ``send_timeout`` seconds while the answer waits
  for it is disconnected, and what was buffered for it dropped (it held the answer, and through a
  relay the upstream's, for as long as it stayed connected);
- beyond ``max_connections`` open connections a new one gets 503 ``too_many_connections``;
- a request head over ``max_head_bytes`` gets 431 ``headers_too_large`` (httptools holds a head of
  any size: one client sent a 114 MB header in 8 s and the gateway grew by 285 MB);
- a request httptools cannot parse gets 400 ``invalid_http`` as JSON (uvicorn's own answer is
  plain text), and one that asks to switch protocols (``Connection: upgrade``) 400
  ``upgrade_not_supported``: no route here speaks another protocol, and httptools takes the
  bytes after such a request's head for the new protocol's, so its body never reached the app,
  and bytes arriving later were parsed as a further request (a body smuggled in as a request);
- a transfer coding besides ``chunked`` (``gzip, chunked``) gets 501 ``unsupported_transfer_coding``.

Each of these is logged, at most one line per second per kind (uvicorn's own line per
malformed request is dropped: a client could write the log full with them).

A client's address (the loopback check for internal details in errors) is its connection's peer;
behind a reverse proxy, ``FORWARDED_ALLOW_IPS`` names the proxies whose ``X-Forwarded-For`` is
believed (uvicorn's own setting, off unless set).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import resource
import socket
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("server")

# After a refusal the server half-closes and reads what the client still sends for this long:
# closing a socket with unread input sends a TCP reset, which can destroy the answer in flight.
LINGER_SECONDS = 1.0
# File handles kept out of the connection cap for the app's own use (outgoing connections,
# logs, models), so the cap is reached, and answered with a 503, before accept() starts failing.
FD_RESERVE = 1024


@dataclass(frozen=True)
class ServerLimits:
    header_timeout: float = 10.0
    body_idle_timeout: float = 30.0
    max_connections: int = 20000
    max_head_bytes: int = 64 * 1024  # a Livepeer header is at most 16 KB; browsers' cookies ~8 KB
    send_timeout: float = 30.0  # an answer's reader may take nothing of it this long

    @classmethod
    def from_env(cls) -> ServerLimits:
        """HEADER_TIMEOUT, BODY_IDLE_TIMEOUT and SEND_TIMEOUT (seconds), MAX_CONNECTIONS and
        MAX_HEAD_BYTES, else the defaults."""
        defaults = cls()
        return cls(
            header_timeout=_env_seconds("HEADER_TIMEOUT", defaults.header_timeout),
            body_idle_timeout=_env_seconds("BODY_IDLE_TIMEOUT", defaults.body_idle_timeout),
            max_connections=_env_count("MAX_CONNECTIONS", defaults.max_connections),
            max_head_bytes=_env_count("MAX_HEAD_BYTES", defaults.max_head_bytes),
            send_timeout=_env_seconds("SEND_TIMEOUT", defaults.send_timeout),
        )


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise SystemExit(f"server: {name} must be a positive number of seconds, got {text!r}")
    return value


def _env_count(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not (text.isascii() and text.isdigit() and 0 < int(text) <= 10_000_000):
        raise SystemExit(f"server: {name} must be a whole number from 1 to 10000000, got {text!r}")
    return int(text)


class _RateLimitedLog:
    """Counts one kind of event and logs it at most once per ``interval`` (with the count since)."""

    def __init__(self, message: str, interval: float = 1.0) -> None:
        self.message = message  # %d is the count, then the ``args`` of note()
        self.interval = interval
        self.count = 0
        self.last = -math.inf

    def note(self, *args: Any) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            log.warning(self.message, self.count, *args)
            self.count, self.last = 0, now


class _Flow(FlowControl):
    """uvicorn's flow control, reporting each time the app asks for more of the body.

    ``resume_reading`` runs on every ``receive()``: from then on the client is the one we wait
    for. While the app does not ask (reading paused, or ``Expect: 100-continue`` unanswered),
    a quiet client is not stalling.
    """

    def __init__(self, transport: asyncio.Transport, on_wanted: Callable[[], None]) -> None:
        super().__init__(transport)
        self._on_wanted = on_wanted

    def resume_reading(self) -> None:
        self._on_wanted()
        super().resume_reading()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the head and body deadlines and the connection cap."""

    limits: ClassVar[ServerLimits] = ServerLimits()
    max_connections: ClassVar[int] = ServerLimits().max_connections
    refused: ClassVar[_RateLimitedLog]
    head_timeouts: ClassVar[_RateLimitedLog]
    body_timeouts: ClassVar[_RateLimitedLog]
    send_timeouts: ClassVar[_RateLimitedLog]
    malformed: ClassVar[_RateLimitedLog]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None  # ends the linger after a refusal
        self._send_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # bytes of the answer waiting for the client when the send timer was armed
        self._last_data = 0.0  # loop time of the last bytes received or of the app asking for more
        self._in_head = False  # a request has begun and its head is not complete
        self._in_body = False  # a request head is complete and its body is not
        self._answered = False  # at least one request head completed on this connection
        self._quiet = False  # no bytes since the last response ended
        self._refused = False  # answered and half-closed by us: input is read and dropped
        self._head_bytes = 0  # fed to the parser since the last request head was complete

    @classmethod
    def configured(cls, limits: ServerLimits, max_connections: int) -> type[LimitedHttpToolsProtocol]:
        """A subclass bound to one server's limits (uvicorn builds protocols from a class)."""
        return type(
            cls.__name__,
            (cls,),
            {
                "limits": limits,
                "max_connections": max_connections,
                "refused": _RateLimitedLog("refused %d connections with 503: %d open, the cap is %d"),
                "head_timeouts": _RateLimitedLog(
                    f"408 header_timeout for %d connections (no head in {limits.header_timeout:g} s)"
                ),
                "body_timeouts": _RateLimitedLog(
                    f"408 body_timeout for %d requests (body idle {limits.body_idle_timeout:g} s)"
                ),
                "send_timeouts": _RateLimitedLog(
                    f"closed %d connections whose client read none of its answer in {limits.send_timeout:g} s"
                ),
                "malformed": _RateLimitedLog("refused %d requests, the last with %s"),
            },
        )

    # -- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _Flow(transport, self._note_wanted)
        if len(self.connections) > self.max_connections:
            self.refused.note(len(self.connections), self.max_connections)
            self._refuse(
                503,
                "too_many_connections",
                f"this server holds {self.max_connections} connections already; retry shortly",
            )
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The answer outgrew the transport's buffer: from now on the client must read."""
        super().pause_writing()
        if self._send_timer is None:
            self._arm_send_timer()

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().resume_writing()

    def _arm_send_timer(self) -> None:
        self._unsent = self._unsent_bytes()
        self._send_timer = self.loop.call_later(self.limits.send_timeout, self._send_deadline)

    def _unsent_bytes(self) -> int:
        """What the client has yet to take: the transport's buffer and the kernel's send queue.
        The kernel's counts too: it lets the transport write again only once a third of its
        buffer (megabytes) is free, so a slow reader's progress shows there long before."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                unsent += struct.unpack("i", queued)[0]
        return unsent

    def _send_deadline(self) -> None:
        """No byte of the answer taken for ``send_timeout``: drop the connection and what it
        buffered (the app sees a disconnect). A client that reads slowly but reads is not cut."""
        self._send_timer = None
        if self._unsent_bytes() < self._unsent:
            self._arm_send_timer()
            return
        self.send_timeouts.note()
        # A reset, not a close: closed, the kernel would go on holding and offering the unsent
        # megabytes to the same client (nginx's reset_timedout_connection).
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._last_data = self.loop.time()
        self._quiet = False
        self._feed(data)
        if self._refused or self.transport.is_closing():
            return
        if self._in_body:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_idle_timeout, self._body_deadline)
        elif self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_timer()  # the first bytes after a keep-alive pause longer than the deadline

    def _feed(self, data: bytes) -> None:
        """``data`` to httptools, but at most ``max_head_bytes`` of a request head, which it would
        otherwise hold whatever its size: fed in pieces until the parser has the whole head."""
        while data and not self._in_body:
            room = self.limits.max_head_bytes - self._head_bytes
            if room <= 0:
                self.malformed.note("431 headers_too_large")
                self._refuse(
                    431,
                    "headers_too_large",
                    f"the request line and headers are over {self.limits.max_head_bytes} bytes;"
                    " send less in headers (a big value belongs in the body)",
                )
                return
            if data.find(b"\r\n\r\n", 0, room) != -1:
                break  # the head ends within its bound: the parser takes everything at once
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
            if self._refused or self.transport.is_closing():
                return
        if data:
            super().data_received(data)

    # -- parser callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head, self._in_body, self._answered = False, True, True
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self.parser.should_upgrade():  # before the app sees it: it would get an empty body
            self.malformed.note("400 upgrade_not_supported")
            self._refuse(
                400,
                "upgrade_not_supported",
                "this server speaks HTTP/1.1 only and switches to no other protocol: send the request"
                " without 'Connection: upgrade' and 'Upgrade' (curl: --http1.1, not --http2, for http://)",
            )
            return
        codings = self._transfer_codings()
        if len(codings) > 1 and codings[-1] == b"chunked":  # chunked not last: httptools' 400
            self.malformed.note("501 unsupported_transfer_coding")
            self._refuse(
                501,
                "unsupported_transfer_coding",
                "the only transfer coding taken is 'Transfer-Encoding: chunked': send the body as it is"
                " (a compressed body uncompressed, or with Content-Encoding where a route takes one)",
            )
            return
        super().on_headers_complete()

    def _transfer_codings(self) -> list[bytes]:
        """The request's transfer codings in order. httptools takes ``gzip, chunked`` as chunked
        and hands on the still compressed body as if it were the body itself (RFC 9112 6.1: a
        coding the server does not know gets a 501; one not ending in chunked, a 400)."""
        return [
            coding.strip().lower()
            for name, value in self.headers
            if name == b"transfer-encoding"
            for coding in value.split(b",")
            if coding.strip()
        ]

    def send_400_response(self, msg: str) -> None:
        """httptools refused the bytes as HTTP/1.1: the JSON error, and the rest of the input
        drained before the close (uvicorn closes at once, and the reset can destroy the answer)."""
        self.malformed.note("400 invalid_http")
        self._refuse(
            400,
            "invalid_http",
            "the request is not valid HTTP/1.1: check the request line, that header names and values"
            " hold no control characters, and the Content-Length or Transfer-Encoding",
        )

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # With a pipelined request queued, its head is already complete: no head deadline.
        next_head_pending = not self.pipeline
        super().on_response_complete()
        if next_head_pending and not self.transport.is_closing():
            self._quiet = True
            self._arm_head_timer()

    # -- deadlines -------------------------------------------------------------------------------

    def _note_wanted(self) -> None:
        self._last_data = self.loop.time()

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_deadline)

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._answered and not self._in_head:
            # Between requests a 408 could be read as the answer to a request the client is
            # sending right now. A quiet connection is uvicorn's keep-alive timer's to close
            # (clients' pools expect that one), and its next bytes start a new deadline; bytes
            # that begin no request (blank lines) are not allowed to hold it open.
            if not self._quiet:
                self.transport.close()
            return
        self.head_timeouts.note()
        self._refuse(
            408,
            "header_timeout",
            f"the request line and headers did not arrive within {self.limits.header_timeout:g} s;"
            " send the whole request head at once",
        )

    def _body_deadline(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or not self._in_body:
            return
        now, timeout = self.loop.time(), self.limits.body_idle_timeout
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            self._last_data = now  # the server is the one not reading: the client is not late
        idle = now - self._last_data
        if idle < timeout:
            self._body_timer = self.loop.call_later(timeout - idle, self._body_deadline)
            return
        self.body_timeouts.note()
        if cycle is not None and cycle.response_started:
            self.transport.close()  # too late for a status; the app sees a disconnect
            return
        self._refuse(
            408,
            "body_timeout",
            f"no request body bytes for {timeout:g} s; send the body as fast as its Content-Length promises",
        )

    def _refuse(self, status: int, code: str, detail: str) -> None:
        """Answer ``status`` with the JSON error, half-close, drop further input, close soon.

        A request in progress sees a disconnect and whatever it answers is not written.
        """
        self._refused = True
        self._cancel_timers()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        body = json.dumps({"error": code, "detail": detail}).encode()
        head = [STATUS_LINE[status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()  # drain what the client still sends, so the close is clean
        self._close_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer, self._close_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._close_timer = self._send_timer = None


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the resulting soft limit.

    Every connection is a file handle and the usual soft limit (1024) is far below what a
    server under attack must hold open before its connection cap answers.
    """
    unlimited = 1 << 20  # Linux's usual ceiling (fs.nr_open) stands in for "infinity"
    soft, hard = (
        unlimited if value == resource.RLIM_INFINITY else value
        for value in resource.getrlimit(resource.RLIMIT_NOFILE)
    )
    wanted = min(hard, unlimited)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    except (ValueError, OSError) as exc:
        log.warning("open files: cannot raise the limit from %d to %d (%s)", soft, wanted, exc)
        return soft
    return wanted


def connection_cap(limits: ServerLimits, open_files: int) -> int:
    """MAX_CONNECTIONS, lowered to fit the file handle limit with :data:`FD_RESERVE` to spare."""
    reserve = min(FD_RESERVE, open_files // 4)
    return max(1, min(limits.max_connections, open_files - reserve))


FORWARDED_ALLOW_IPS = "FORWARDED_ALLOW_IPS"  # uvicorn reads it itself when proxy headers are on


class _DropPerRequestWarnings(logging.Filter):
    """uvicorn's warning per malformed or upgrade request: the protocol logs those, rate-limited."""

    WARNINGS = (
        "Invalid HTTP request received.",
        "Unsupported upgrade request.",
        "No supported WebSocket library",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.WARNINGS)


def serve(app: Any, host: str, port: int, limits: ServerLimits | None = None) -> None:
    """``uvicorn.run`` (httptools, uvloop, no access log) with :class:`ServerLimits` enforced."""
    limits = limits or ServerLimits.from_env()
    open_files = raise_open_file_limit()
    cap = connection_cap(limits, open_files)
    log.info(
        "limits: open files %d, connections %d%s, request head %g s and %d bytes, body idle %g s,"
        " answer unread %g s",
        open_files,
        cap,
        f" (MAX_CONNECTIONS {limits.max_connections} lowered to fit)" if cap < limits.max_connections else "",
        limits.header_timeout,
        limits.max_head_bytes,
        limits.body_idle_timeout,
        limits.send_timeout,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=LimitedHttpToolsProtocol.configured(limits, cap),
        loop="uvloop",
        access_log=False,
        log_level="warning",
        # uvicorn's default believes X-Forwarded-For from loopback: no hop here is a proxy.
        proxy_headers=bool(os.environ.get(FORWARDED_ALLOW_IPS)),
        server_header=False,
        ws="none",  # no route is a WebSocket; an upgrade request gets a JSON 400 (above)
    )
    logging.getLogger("uvicorn.error").addFilter(_DropPerRequestWarnings())  # after Config's logging set-up
    uvicorn.Server(config).run()

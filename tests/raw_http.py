"""HTTP/1.1 over a raw socket, for the tests that send what no client library would.

A lying ``Content-Length``, CR/LF or NUL in a header, a path no client would leave unnormalised,
a head dripped byte by byte: httpx refuses or repairs all of these, so the tests that attack the
servers' parsing write the bytes themselves and read the answer here. One reader for all of
them, so that each test differs only in what it sends.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass


def chunked(body: bytes) -> bytes:
    """``body`` in chunked framing, as one chunk and the last (an empty body is the last alone)."""
    return (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes

    @property
    def is_json(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/json")


def read_response(sock: socket.socket, *, head_request: bool = False) -> RawResponse | None:
    """One response: its head, then a body of its ``Content-Length`` (none if it answers a
    ``HEAD`` request), or up to the close when it has neither. None if the connection ended
    before a whole head. A reset in the body ends the body: a server that refused a request
    early may reset the connection while the rest of the upload still arrives."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
    except ConnectionResetError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)
    }
    length = 0 if head_request else int(headers.get("content-length", -1))
    try:
        while (length < 0 or len(body) < length) and (chunk := sock.recv(65536)):
            body += chunk
    except ConnectionResetError:
        pass
    return RawResponse(int(status_line.split()[1]), headers, body)


def raw_exchange(
    port: int, request: bytes, *, timeout: float = 10.0, half_close: bool = False, host: str = "127.0.0.1"
) -> RawResponse | None:
    """Send ``request`` exactly as written on a new connection and read the answer.

    ``half_close`` stops sending after it, so that a body shorter than its ``Content-Length``
    is answered without waiting for the server's body deadline. A reset while sending is no
    failure: a server may answer and close before the whole request arrived.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_response(sock, head_request=request.startswith(b"HEAD "))

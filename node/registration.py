"""What a container declares when it registers, and the checks that declaration must pass.

A registration comes from the network (``POST /capability/register``, authenticated by the
orchestrator's secret) or from ``-byocModelID`` flags. Its URL is where the orchestrator will send
every user's jobs and its token, so only plain ``http``/``https`` URLs of a real host are taken:
no credentials, no link-local, unspecified or cloud-metadata address, however it is spelled.
Every other field is bounded and free of control characters, because it ends up in logs and
in ``/status``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver

from common.errors import ApiError
from common.names import check_model_id

MAX_CAPACITY = 1024
MAX_PRICE = 2**63 - 1  # go-livepeer's int64
MAX_DESCRIPTION = 1024
MAX_CURRENCY = 16
MAX_TOKEN = 4096
MAX_URL = 2048
RESOLVE_TIMEOUT = 2.0

# Cloud metadata services: a registration must not turn the orchestrator into a proxy to them.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "metadata.azure.internal"})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)


class Protocol(str, Enum):
    """How the orchestrator talks to a container: go-livepeer's plain POST, or our trickle contract."""

    HTTP = "http"
    TRICKLE = "trickle"


@dataclass(frozen=True)
class Registration:
    """What a container (or a ``-byocModelID`` flag) declares: go-livepeer's keys plus ``protocol``."""

    name: str
    url: str
    capacity: int = 1
    protocol: Protocol = Protocol.HTTP
    description: str = ""
    price_per_unit: int = 0
    price_scaling: int = 1
    currency: str = "wei"
    token: str = ""


def _invalid(detail: str) -> ApiError:
    return ApiError(400, "invalid_registration", detail)


def _text(body: dict[str, Any], key: str, default: str, limit: int) -> str:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise _invalid(
            f"{key} must be a string of at most {limit} printable characters (no control characters)"
        )
    return value


def _integer(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    # bool is an int in Python and Infinity/1e3 arrive as floats: only a real JSON integer will do.
    if type(value) is not int or not low <= value <= high:
        raise _invalid(f"{key} must be an integer from {low} to {high}, not {str(value)[:40]!r}")
    return value


def check_container_url(value: Any) -> str:
    """An ``http``/``https`` URL with a host and no credentials, normalised without a trailing ``/``.

    Where the host is an IP literal, link-local, unspecified and cloud-metadata addresses are
    refused here; names are resolved by :func:`check_resolved_host`.
    """
    shape = 'url must be an http(s) URL of the container, e.g. "http://127.0.0.1:8000"'
    if not isinstance(value, str) or not value or len(value) > MAX_URL or not value.isascii():
        raise _invalid(shape)
    if any(c.isspace() or not c.isprintable() for c in value):
        raise _invalid(f"{shape}; it must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError:
        raise _invalid(shape) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _invalid(f"{shape}; got scheme {parts.scheme!r}")
    if parts.username is not None or parts.password is not None:
        raise _invalid("url must not carry credentials (user:password@); register a token instead")
    if parts.query or parts.fragment:
        raise _invalid("url must not have a query or fragment: jobs are sent to {url}/{path}")
    host = parts.hostname.rstrip(".").lower()
    if host in METADATA_HOSTS:
        raise _invalid(f"url host {host!r} is a cloud metadata service, not a container")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return value.rstrip("/")
    _check_address(address, host)
    return value.rstrip("/")


def _forbidden(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why no container may have ``address`` ("a cloud metadata address"), or None if one may."""
    candidates = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)  # ::ffff:169.254.169.254 is 169.254.169.254
    for candidate in candidates:
        if candidate in METADATA_ADDRESSES:
            return "a cloud metadata address"
        if candidate.is_link_local or candidate.is_unspecified or candidate.is_multicast:
            return "a link-local, unspecified or multicast address"
    return None


def _check_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str) -> None:
    if (what := _forbidden(address)) is not None:
        raise _invalid(f"url host {host!r} is {what}; register the container's real address, e.g. 127.0.0.1")


async def check_resolved_host(url: str) -> None:
    """Refuse a host name whose addresses are forbidden (``169.254.169.254.nip.io``, ``2852039166``).

    Checked when the container registers, so that the registration fails with the reason; a name
    that resolves elsewhere later (DNS rebinding) meets :class:`CheckedResolver` at each new
    connection.
    """
    host = urlsplit(url).hostname or ""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError):
        raise _invalid(
            f"url host {host!r} does not resolve; register an address the orchestrator can reach"
        ) from None
    for info in infos:
        _check_address(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]), host)


def registration_from_json(body: Any) -> Registration:
    """Validate a ``/capability/register`` body (go-livepeer's keys plus ``protocol``); unknown keys
    are ignored, as go-livepeer does."""
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object")
    if "name" not in body or "url" not in body:
        raise _invalid(
            'name and url are required, e.g. {"name": "green-tint-cpu", "url": "http://127.0.0.1:8000"}'
        )
    name = check_model_id(body["name"], "name")
    url = check_container_url(body["url"])
    try:
        protocol = Protocol(body.get("protocol", Protocol.HTTP.value))
    except ValueError:
        raise _invalid(f"protocol must be one of {[p.value for p in Protocol]}") from None
    token = _text(body, "token", "", MAX_TOKEN)
    if not all("!" <= c <= "~" for c in token):  # it becomes the header value "Bearer <token>"
        raise _invalid("token must be visible ASCII without spaces")
    return Registration(
        name=name,
        url=url,
        capacity=_integer(body, "capacity", 1, 1, MAX_CAPACITY),
        protocol=protocol,
        description=_text(body, "description", "", MAX_DESCRIPTION),
        price_per_unit=_integer(body, "price_per_unit", 0, 0, MAX_PRICE),
        price_scaling=_integer(body, "price_scaling", 1, 0, MAX_PRICE) or 1,  # go-livepeer: 0 means 1
        currency=_text(body, "currency", "wei", MAX_CURRENCY),
        token=token,
    )


def unregister_name(body: bytes) -> str:
    """go-livepeer's unregister body: the capability name as plain text."""
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _invalid("the body must be the capability name as UTF-8 text") from None
    return check_model_id(text, "the capability name")


class CheckedResolver(ThreadedResolver):
    """aiohttp's resolver, less the addresses a registration may not name.

    A registered name is checked when it registers, but the node resolves it again for each new
    connection: a name that passed with a real address and now answers 169.254.169.254 would
    turn the orchestrator into a proxy to the metadata service, with every job's body and the
    container's token. Such answers are dropped here; a name left with none does not connect.
    """

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await super().resolve(host, port, family)
        allowed = [r for r in results if _forbidden(ipaddress.ip_address(r["host"].split("%", 1)[0])) is None]
        if not allowed:
            # With an errno, aiohttp's ClientConnectorError shows the text ("[None]" without).
            raise OSError(
                errno.EPERM, f"{host} resolves only to addresses no container may have ({results[0]['host']})"
            )
        return allowed

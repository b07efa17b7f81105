"""The orchestrator's capabilities: who serves each model id, how busy, how healthy, who waits.

Capacity is a counter per capability. A job or stream takes one unit for as long as its container
works on it; when every unit is taken, new jobs wait in a bounded FIFO (``-byocQueue``, at most
``-byocQueueTimeout``) instead of being bounced, and a freed unit is handed straight to the oldest
waiter. Only a full queue or an expired wait is a 503 ``at_capacity``. A container whose
``/health`` fails is ``container_unhealthy``: never reported as busy, and nobody queues behind it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import deque
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import httpx

from common.errors import ApiError
from common.names import check_model_id

log = logging.getLogger("registry")

MAX_CAPACITY = 1024
MAX_PRICE = 2**63 - 1  # go-livepeer's int64
MAX_DESCRIPTION = 1024
MAX_CURRENCY = 16
MAX_TOKEN = 4096
MAX_URL = 2048
RESOLVE_TIMEOUT = 2.0
HEALTH_TIMEOUT = 2.0
# A job for an unhealthy container asks it again (one probe at a time), unless it was asked this
# recently: a container that just came back serves at once, and a dead one costs one refused connect.
RECHECK_AFTER = 0.1

# Cloud metadata services: a registration must not turn the orchestrator into a proxy to them.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "metadata.azure.internal"})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)


class Protocol(str, Enum):
    """How the orchestrator talks to a container: go-livepeer's plain POST, or our trickle contract."""

    HTTP = "http"
    TRICKLE = "trickle"


class Health(str, Enum):
    """A container's ``/health`` as last seen; UNREACHABLE when it did not answer at all."""

    UNKNOWN = "UNKNOWN"
    LOADING = "LOADING"
    IDLE = "IDLE"
    OK = "OK"
    ERROR = "ERROR"
    UNREACHABLE = "UNREACHABLE"


UNHEALTHY = frozenset({Health.ERROR, Health.UNREACHABLE})


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


@dataclass(frozen=True)
class QueuePolicy:
    """``-byocQueue`` waiting places per capability, each waiting at most ``-byocQueueTimeout``."""

    limit: int = 16
    wait: float = 10.0


class Capability:
    """One registered model id: its registration and its live state (load, health, queue)."""

    def __init__(self, registration: Registration) -> None:
        self.registration = registration
        self.load = 0
        self.health = Health.UNKNOWN
        self.checked_at = 0.0  # monotonic time of the last health answer (or failure)
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.probe: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.registration.name

    @property
    def url(self) -> str:
        return self.registration.url

    @property
    def capacity(self) -> int:
        return self.registration.capacity

    @property
    def protocol(self) -> Protocol:
        return self.registration.protocol

    @property
    def token(self) -> str:
        return self.registration.token

    @property
    def free(self) -> int:
        return max(self.capacity - self.load, 0)

    def public(self, show_url: bool = True) -> dict[str, Any]:
        """What ``/status`` shows: never the token; the URL only to a caller on loopback."""
        fields = asdict(self.registration)
        fields.pop("token")
        fields["protocol"] = self.protocol.value
        if not show_url:
            fields.pop("url")
        return {**fields, "load": self.load, "queued": len(self.waiters), "health": self.health.value}


# -- registration bodies ----------------------------------------------------------------------------


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


def _check_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str) -> None:
    candidates = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)  # ::ffff:169.254.169.254 is 169.254.169.254
    for candidate in candidates:
        if candidate in METADATA_ADDRESSES:
            raise _invalid(f"url host {host!r} is a cloud metadata address, not a container")
        if candidate.is_link_local or candidate.is_unspecified or candidate.is_multicast:
            raise _invalid(
                f"url host {host!r} is a link-local, unspecified or multicast address; "
                "register the container's real address, e.g. 127.0.0.1"
            )


async def check_resolved_host(url: str) -> None:
    """Refuse a host name whose addresses are forbidden (``169.254.169.254.nip.io``, ``2852039166``).

    Checked once, when the container registers; a name that later resolves elsewhere is not
    re-checked on every job (the secret is what keeps strangers from registering at all).
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


# -- the registry ---------------------------------------------------------------------------------


class Registry:
    def __init__(self, queue: QueuePolicy | None = None) -> None:
        self.queue = queue or QueuePolicy()
        self.capabilities: dict[str, Capability] = {}

    def register(self, registration: Registration) -> Capability:
        """Add or update a capability. Containers re-register every few seconds: the entry, its load
        and its queue stay, so jobs in flight keep counting against it (go-livepeer resets load and
        then over-advertises)."""
        current = self.capabilities.get(registration.name)
        if current is None:
            current = self.capabilities[registration.name] = Capability(registration)
            log.info("BYOC capability registered: %s", registration.name)
        elif current.registration == registration:
            return current
        else:
            if current.url != registration.url:
                current.health, current.checked_at = Health.UNKNOWN, 0.0  # a new container: ask it
            current.registration = registration
            self._admit(current)  # more capacity than before: let waiters in
        log.info(
            "capability %s: %s at %s, capacity %d",
            registration.name,
            registration.protocol.value,
            registration.url,
            registration.capacity,
        )
        return current

    def unregister(self, name: str) -> None:
        capability = self.capabilities.pop(name, None)
        if capability is not None:
            self._reject_waiters(capability, self._unknown(name))
            log.info("BYOC capability unregistered: %s", name)

    def names(self) -> list[str]:
        return sorted(self.capabilities)

    def _unknown(self, name: str) -> ApiError:
        return ApiError(
            503,
            "no_capacity",
            f"No capacity available for capability {name!r}: it is not registered here; "
            f"registered: {', '.join(self.names()) or 'none'}",
        )

    def get(self, name: str) -> Capability:
        capability = self.capabilities.get(name)
        if capability is None:
            raise self._unknown(name)
        return capability

    def admits(self, capability: Capability) -> int:
        """How many more jobs would be accepted now: free units plus free places in the queue."""
        return capability.free + max(self.queue.limit - len(capability.waiters), 0)

    # -- capacity ---------------------------------------------------------------------------

    async def acquire(self, name: str, wait: float) -> Capability:
        """Take one unit of ``name``'s capacity, waiting in its FIFO for at most ``wait`` seconds
        (and the queue's own limit). The caller owns the unit and must :meth:`release` it."""
        capability = self.get(name)
        if capability.health in UNHEALTHY:
            raise unhealthy(capability)
        if capability.load < capability.capacity and not capability.waiters:
            capability.load += 1
            return capability
        if len(capability.waiters) >= self.queue.limit:
            raise self._full(capability, f"its queue of {self.queue.limit} is full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        capability.waiters.append(waiter)
        limit = min(wait, self.queue.wait)
        try:
            async with asyncio.timeout(limit):
                await waiter
        except BaseException as exc:
            self._leave(capability, waiter)
            if isinstance(exc, TimeoutError):
                raise self._full(capability, f"no unit came free within {limit:g} s in its queue") from None
            raise
        return capability

    def _leave(self, capability: Capability, waiter: asyncio.Future[None]) -> None:
        """A waiter gives up (timeout, cancellation, rejection): it never keeps or loses a unit."""
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self.release(capability)  # a unit was handed over as it gave up: pass it on
            return
        waiter.cancel()
        try:
            capability.waiters.remove(waiter)
        except ValueError:
            pass  # already taken off the queue by whoever rejected it

    def release(self, capability: Capability) -> None:
        capability.load -= 1
        self._admit(capability)

    @staticmethod
    def _admit(capability: Capability) -> None:
        """Hand free units to the oldest waiters still waiting."""
        while capability.load < capability.capacity and capability.waiters:
            waiter = capability.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                capability.load += 1

    @staticmethod
    def _reject_waiters(capability: Capability, error: ApiError) -> None:
        while capability.waiters:
            waiter = capability.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    @staticmethod
    def _full(capability: Capability, why: str) -> ApiError:
        return ApiError(
            503,
            "at_capacity",
            f"{capability.name} is busy ({capability.load}/{capability.capacity} jobs running, "
            f"{len(capability.waiters)} waiting) and {why}; retry shortly",
            {"Retry-After": "1"},
        )

    # -- health -----------------------------------------------------------------------------

    def set_health(self, capability: Capability, health: Health, seen_at: float) -> None:
        """Record what was seen at ``seen_at`` (when the check began), unless something newer is
        known: a poll answered just before a crash must not undo the crash's verdict."""
        if seen_at < capability.checked_at:
            return
        capability.checked_at = seen_at
        if health == capability.health:
            return
        log.info("capability %s health: %s -> %s", capability.name, capability.health.value, health.value)
        capability.health = health
        if health in UNHEALTHY:  # nobody waits behind a container that cannot answer
            self._reject_waiters(capability, unhealthy(capability))

    async def watch_health(self, client: httpx.AsyncClient, interval: float) -> None:
        """Poll every container's ``/health`` and log each change of state."""
        while True:
            await asyncio.gather(
                *(self.check(client, c) for c in list(self.capabilities.values())), return_exceptions=True
            )
            await asyncio.sleep(interval)

    async def check(self, client: httpx.AsyncClient, capability: Capability) -> None:
        started = time.monotonic()
        try:
            response = await client.get(f"{capability.url}/health", timeout=HEALTH_TIMEOUT)
            health = _health_of(response)
        except httpx.HTTPError:
            health = Health.UNREACHABLE
        self.set_health(capability, health, started)

    async def recheck(self, client: httpx.AsyncClient, capability: Capability) -> None:
        """Ask an unhealthy container again now, so one that came back serves at once, with one
        probe at a time and at most one per :data:`RECHECK_AFTER` however many jobs ask."""
        if capability.probe is None or capability.probe.done():
            if time.monotonic() - capability.checked_at < RECHECK_AFTER:
                return
            capability.probe = asyncio.create_task(self.check(client, capability))
        await asyncio.shield(capability.probe)


def _health_of(response: httpx.Response) -> Health:
    if not response.is_success:  # 3xx included: redirects are not followed
        return Health.ERROR
    try:
        body = response.json()
    except ValueError:
        return Health.ERROR
    status = body.get("status") if isinstance(body, dict) else None
    try:
        health = Health(status)
    except ValueError:
        return Health.ERROR
    return Health.ERROR if health in (Health.UNKNOWN, Health.UNREACHABLE) else health


def unhealthy(capability: Capability) -> ApiError:
    return ApiError(
        503,
        "container_unhealthy",
        f"the container for {capability.name} fails its health check ({capability.health.value}): "
        "it is down or broken, so no job waits for it; check its logs, it is retried by itself",
        {"Retry-After": "2"},
    )

"""The orchestrator's capabilities: who serves each model id, how busy, how healthy, who waits.

Capacity is a counter per capability. A job or stream takes one unit for as long as its container
works on it; when every unit is taken, new jobs wait in a bounded FIFO (``-byocQueue``, at most
``-byocQueueTimeout``) instead of being bounced, and a freed unit is handed straight to the oldest
waiter. Only a full queue or an expired wait is a 503 ``at_capacity``. A container whose
``/health`` fails is ``container_unhealthy``: never reported as busy, and nobody queues behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import httpx

from common.errors import ApiError

from .registration import Protocol, Registration

log = logging.getLogger("registry")

HEALTH_TIMEOUT = 2.0
# A job for an unhealthy container asks it again (one probe at a time), unless it was asked this
# recently: a container that just came back serves at once, and a dead one costs one refused connect.
RECHECK_AFTER = 0.1


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

    def auth_headers(self) -> dict[str, str]:
        """What every call to the container carries: its bearer token, when it registered one."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

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

    def set_health(
        self, capability: Capability, health: Health, seen_at: float, error: Exception | None = None
    ) -> None:
        """Record what was seen at ``seen_at`` (when the check began), unless something newer is
        known: a poll answered just before a crash must not undo the crash's verdict. ``error``
        (the connection's) goes into the log line of a change."""
        if seen_at < capability.checked_at:
            return
        capability.checked_at = seen_at
        if health == capability.health:
            return
        log.info(
            "capability %s health: %s -> %s%s",
            capability.name,
            capability.health.value,
            health.value,
            "" if error is None else f" ({str(error) or type(error).__name__})",
        )
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
            self.set_health(capability, _health_of(response), started)
        except httpx.HTTPError as exc:
            self.set_health(capability, Health.UNREACHABLE, started, exc)

    async def recheck(self, client: httpx.AsyncClient, capability: Capability) -> None:
        """Ask an unhealthy container again now, so one that came back serves at once, with one
        probe at a time and at most one per :data:`RECHECK_AFTER` however many jobs ask."""
        if capability.probe is None or capability.probe.done():
            # Asked a moment ago (a container still starting, say): wait out the rest of that
            # moment rather than refuse on an answer that may already be stale.
            await asyncio.sleep(max(capability.checked_at + RECHECK_AFTER - time.monotonic(), 0))
            if capability.health not in UNHEALTHY:
                return
            if capability.probe is None or capability.probe.done():
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

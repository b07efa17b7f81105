"""The orchestrator's capabilities: who serves each model id, how busy, how healthy.

Capacity is a counter per capability, reserved for the life of a job or stream and released in a
``finally`` (go-livepeer leaks a unit on timeouts; we must not).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from common.errors import ApiError

log = logging.getLogger("registry")

PROTOCOLS = ("http", "trickle")


@dataclass
class Capability:
    name: str
    url: str
    capacity: int = 1
    protocol: str = "http"  # "trickle": our trickle contract; "http": go-livepeer's plain POST
    description: str = ""
    price_per_unit: int = 0
    price_scaling: int = 1
    currency: str = "wei"
    token: str = ""
    load: int = 0
    health: str = "UNKNOWN"

    def public(self) -> dict[str, Any]:
        fields = asdict(self)
        fields.pop("token")
        return fields


def capability_from_json(body: Any) -> Capability:
    """Validate a ``/capability/register`` body (go-livepeer keys plus ``protocol``)."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_registration", "the body must be a JSON object")
    name, url = body.get("name"), body.get("url")
    if not isinstance(name, str) or not name or not isinstance(url, str) or "://" not in url:
        raise ApiError(
            400,
            "invalid_registration",
            'name and url are required, e.g. {"name": "green-tint-cpu", "url": "http://127.0.0.1:8000"}',
        )
    protocol = body.get("protocol", "http")
    if protocol not in PROTOCOLS:
        raise ApiError(400, "invalid_registration", f"protocol must be one of {PROTOCOLS}")
    try:
        return Capability(
            name=name,
            url=url.rstrip("/"),
            capacity=int(body.get("capacity", 1)),
            protocol=protocol,
            description=str(body.get("description", "")),
            price_per_unit=int(body.get("price_per_unit", 0)),
            price_scaling=int(body.get("price_scaling") or 1),
            currency=str(body.get("currency", "wei")),
            token=str(body.get("token", "")),
        )
    except (TypeError, ValueError) as exc:
        raise ApiError(400, "invalid_registration", f"capacity and prices must be integers: {exc}") from None


class Registry:
    def __init__(self) -> None:
        self.capabilities: dict[str, Capability] = {}

    def register(self, capability: Capability) -> None:
        current = self.capabilities.get(capability.name)
        if current is not None and current.url == capability.url:
            # Containers re-register every few seconds. Update in place so the jobs in flight keep
            # counting against this entry (go-livepeer resets load and then over-advertises).
            capability.load, capability.health = current.load, current.health
            if capability == current:
                return
            vars(current).update(vars(capability))
        else:
            self.capabilities[capability.name] = capability
        log.info("BYOC capability registered: %s", capability.name)
        log.info(
            "capability %s: %s at %s, capacity %d",
            capability.name,
            capability.protocol,
            capability.url,
            capability.capacity,
        )

    def unregister(self, name: str) -> None:
        if self.capabilities.pop(name, None) is not None:
            log.info("BYOC capability unregistered: %s", name)

    def names(self) -> list[str]:
        return sorted(self.capabilities)

    def get(self, name: str) -> Capability:
        capability = self.capabilities.get(name)
        if capability is None:
            raise ApiError(
                503,
                "no_capacity",
                f"No capacity available for capability {name!r}: it is not registered here; "
                f"registered: {', '.join(self.names()) or 'none'}",
            )
        return capability

    def acquire(self, name: str) -> Capability:
        """Take one unit of ``name``'s capacity, or refuse with 503 and ``Retry-After``."""
        capability = self.get(name)
        if capability.load >= capability.capacity:
            raise ApiError(
                503,
                "at_capacity",
                f"{name} is busy ({capability.load}/{capability.capacity} jobs); retry shortly",
                {"Retry-After": "1"},
            )
        capability.load += 1
        return capability

    @staticmethod
    def release(capability: Capability) -> None:
        capability.load -= 1

    @contextlib.contextmanager
    def reserve(self, name: str) -> Iterator[Capability]:
        """Hold one unit of capacity for the duration of the block, whatever happens in it."""
        capability = self.acquire(name)
        try:
            yield capability
        finally:
            self.release(capability)

    async def watch_health(self, client: httpx.AsyncClient, interval: float) -> None:
        """Poll every container's ``/health`` and log each change of state."""
        while True:
            await asyncio.gather(
                *(self._check(client, c) for c in list(self.capabilities.values())),
                return_exceptions=True,
            )
            await asyncio.sleep(interval)

    async def _check(self, client: httpx.AsyncClient, capability: Capability) -> None:
        try:
            response = await client.get(f"{capability.url}/health", timeout=2.0)
            status = str(response.json().get("status", "UNKNOWN")) if response.is_success else "ERROR"
        except (httpx.HTTPError, ValueError):
            status = "UNREACHABLE"
        if status != capability.health:
            log.info("capability %s health: %s -> %s", capability.name, capability.health, status)
            capability.health = status

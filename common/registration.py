"""Self-registration with an orchestrator (ours or go-livepeer's), when ORCH_URL and ORCH_SECRET are set.

Registrations live only in the orchestrator's memory, so the container registers again every
``interval`` seconds: an orchestrator that restarted, or dropped us after an error, gets us back
without anyone restarting the container.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx

log = logging.getLogger("registration")


@dataclass(frozen=True)
class Registration:
    orch_url: str
    secret: str
    name: str
    url: str  # where the orchestrator reaches this container
    capacity: int = 1
    interval: float = 10.0
    token: str | None = None  # the bearer token the orchestrator must send us (go-livepeer's field)

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {
            "name": self.name,
            "url": self.url,
            "capacity": self.capacity,
            "protocol": "trickle",
            "description": f"BYOC processor {self.name}",
            "price_per_unit": 0,
            "price_scaling": 1,
            "currency": "wei",
        }
        if self.token:
            body["token"] = self.token
        return body

    async def keep_registered(self) -> None:
        registered = False
        # go-livepeer orchestrators serve HTTPS with a self-signed certificate.
        async with httpx.AsyncClient(verify=False, timeout=5.0) as client:
            while True:
                try:
                    response = await client.post(
                        f"{self.orch_url.rstrip('/')}/capability/register",
                        json=self.body(),
                        headers={"Authorization": self.secret},
                    )
                    ok = response.status_code == 200
                    problem = f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, problem = False, repr(exc)
                if ok and not registered:
                    log.info("registered %s at %s with %s", self.name, self.url, self.orch_url)
                elif not ok:
                    log.warning("registering %s with %s failed: %s", self.name, self.orch_url, problem)
                registered = ok
                await asyncio.sleep(self.interval if ok else min(self.interval, 2.0))

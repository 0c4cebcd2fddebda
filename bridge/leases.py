"""Domain leases: one ATRN session collects a domain at a time.

A lease is an expiring Redis key holding the session's random token
(``SET NX PX``), renewed while the session runs and released with a
compare-and-delete script, so a crashed session's lease simply expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from odmr_bridge.index import Index

log = logging.getLogger("odmr_bridge.leases")
RELEASE_TIMEOUT = 2.0


class LeaseKeeper:
    """Holds one ATRN lease per domain and renews them while the session runs."""

    def __init__(self, index: Index, ttl: float) -> None:
        self.index = index
        self.ttl = ttl
        self.token = index.new_token()
        self.domains: list[str] = []
        self.lost = False
        self._task: asyncio.Task[None] | None = None

    async def acquire(self, domains: list[str]) -> bool:
        for domain in domains:
            if not await self.index.acquire(domain, self.token, self.ttl):
                await self.release()
                return False
            self.domains.append(domain)
        self._task = asyncio.create_task(self._renew())
        return True

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            for domain in self.domains:
                if not await self.index.renew(domain, self.token, self.ttl):
                    log.warning("lease on %s lost; stopping delivery", domain)
                    self.lost = True
                    return

    async def release(self) -> None:
        """Best effort: a lease not released here expires after its TTL anyway."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for domain in self.domains:
            try:
                async with asyncio.timeout(RELEASE_TIMEOUT):
                    await self.index.release(domain, self.token)
            except Exception as exc:
                log.warning("lease on %s not released (%s); it expires by itself",
                            domain, type(exc).__name__)
        self.domains = []

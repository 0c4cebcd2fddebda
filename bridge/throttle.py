"""Failed-AUTH throttling per client address and per user name, shared via Redis.

After ``max_failures`` failures within ``window`` seconds (counted from the
first), further AUTH attempts for that address or user wait ``delay`` seconds
and get ``454 4.7.0``.  Counters are expiring Redis keys, so every bridge
instance sees the same ones and they vanish on their own.
"""

from __future__ import annotations

import dataclasses

from redis.commands.core import AsyncScript

from odmr_bridge import keys
from odmr_bridge.index import load_script
from odmr_bridge.redis_topology import AsyncClient


@dataclasses.dataclass(frozen=True)
class ThrottlePolicy:
    max_failures: int = 5
    window: float = 300.0
    delay: float = 5.0


class AuthThrottle:
    def __init__(self, client: AsyncClient, policy: ThrottlePolicy) -> None:
        self.redis = client
        self.policy = policy
        self._count: AsyncScript = client.register_script(load_script("count_failure.lua"))

    async def prepare(self) -> None:
        await self.redis.script_load(self._count.script)

    async def blocked(self, address: str, user: str | None = None) -> bool:
        names = [keys.auth_failures_by_address(address)]
        if user is not None:
            names.append(keys.auth_failures_by_user(user))
        # One GET per counter: they live in different slots (no MGET in a cluster).
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        counts = await pipe.execute()
        return any(c is not None and int(c) >= self.policy.max_failures for c in counts)

    async def failed(self, address: str, user: str | None) -> None:
        window_ms = int(self.policy.window * 1000)
        await self._count(keys=[keys.auth_failures_by_address(address)], args=[window_ms])
        if user:
            await self._count(keys=[keys.auth_failures_by_user(user)], args=[window_ms])

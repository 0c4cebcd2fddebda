"""Per-client-address connection limits on port 366, like Postfix's anvil(8).

A client address may hold at most ``max_connections`` connections at once and
open at most ``max_rate`` per ``window`` seconds, counted in Redis so every
bridge instance enforces the same limits.  Beyond them the client gets
``421 4.7.0`` and the connection is closed before anything else happens.

Each open connection is registered under an id with a deadline; the node
renews the deadlines of its open connections every ``ttl / 3`` seconds, so a
node that dies leaves nothing behind for longer than ``ttl``.

:class:`AdmissionGate` is the protocol a new connection starts with: reading
stays paused while the anvil decides, then the connection is handed to the
real protocol (``transport.set_protocol``) or refused.  Redis being
unreachable admits the connection (the login still needs Redis and says so).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from odmr_bridge import keys, metrics, replies
from odmr_bridge.index import load_script
from odmr_bridge.logs import Occasional
from odmr_bridge.redis_topology import AsyncClient

log = logging.getLogger("odmr_bridge.anvil")

ADMITTED, TOO_MANY_CONNECTIONS, RATE_EXCEEDED = 0, 1, 2
# Admissions asked of Redis at once (each needs a Redis connection).
CONCURRENT_ADMISSIONS = 16


@dataclasses.dataclass(frozen=True)
class AnvilPolicy:
    max_connections: int = 50  # at once, per client address (0: no limit)
    max_rate: int = 300  # new connections per window, per client address (0: no limit)
    window: float = 60.0
    ttl: float = 90.0  # a dead node's registrations lapse after this long


class Anvil:
    def __init__(self, client: AsyncClient, policy: AnvilPolicy) -> None:
        self.redis = client
        self.policy = policy
        self._node = uuid.uuid4().hex[:12]
        self._serial = 0
        self._open: defaultdict[str, set[str]] = defaultdict(set)
        self._admit: AsyncScript = client.register_script(load_script("anvil_admit.lua"))
        self._asking = asyncio.Semaphore(CONCURRENT_ADMISSIONS)
        self._release_trouble = Occasional()
        self._renew: AsyncScript = client.register_script(load_script("anvil_renew.lua"))

    async def admit(self, address: str) -> tuple[int, str]:
        """(verdict, connection id); the id is registered only when admitted."""
        self._serial += 1
        connection = f"{self._node}:{self._serial}"
        policy = self.policy
        async with self._asking:
            verdict = int(await self._admit(
                keys=[keys.anvil_connections(address), keys.anvil_rate(address)],
                args=[connection, int(policy.ttl * 1000), policy.max_connections,
                      policy.max_rate, int(policy.window * 1000)]))
        if verdict == ADMITTED:
            self._open[address].add(connection)
        return verdict, connection

    async def release(self, address: str, connection: str) -> None:
        ids = self._open.get(address)
        if ids is None or connection not in ids:
            return
        ids.discard(connection)
        if not ids:
            del self._open[address]
        try:
            await self.redis.zrem(keys.anvil_connections(address), connection)
        except (RedisError, OSError) as exc:  # it lapses at its deadline instead
            if self._release_trouble():
                log.warning("warning: anvil: cannot release a connection of [%s]: %s",
                            address, exc)

    async def renew_forever(self) -> None:
        """Keep this node's registrations alive (a task for the daemon's lifetime)."""
        while True:
            await asyncio.sleep(self.policy.ttl / 3)
            ttl_ms = int(self.policy.ttl * 1000)
            for address, ids in list(self._open.items()):
                try:
                    await self._renew(keys=[keys.anvil_connections(address)],
                                      args=[ttl_ms, *ids])
                except RedisError as exc:
                    log.warning("warning: anvil: cannot renew connections of %s: %s",
                                address, exc)
                    break


class AdmissionGate(asyncio.Protocol):
    """A new port-366 connection, held (reading paused) until the anvil admits it.

    *make* builds the real protocol; it is given the function to call when
    that protocol's connection ends (which frees the client's slot).  Bytes
    that arrive before the verdict (some Python 3.11 releases read a new
    connection even when it is paused at once) are handed to that protocol;
    a client that has closed by then has left, and is not served.
    """

    # One line a minute for each kind of trouble, however many connections see it.
    redis_trouble = Occasional()
    local_trouble = Occasional()

    def __init__(self, anvil: Anvil,
                 make: Callable[[Callable[[], None]], asyncio.Protocol]) -> None:
        self.anvil = anvil
        self.make = make
        self._early: list[bytes] = []
        self._eof = False
        self._tls = False  # (set at connection_made)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._tls = transport.get_extra_info("sslcontext") is not None
        transport.pause_reading()
        _in_background(self._decide(transport))

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool:
        self._eof = True  # the client left before the verdict; _decide closes
        return not self._tls  # (TLS transports close by themselves)

    async def _decide(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else ""
        verdict, connection = ADMITTED, ""
        if address:
            try:
                verdict, connection = await self.anvil.admit(address)
            except RedisError as exc:  # the session will say 451 4.4.0 at ATRN
                if self.redis_trouble():
                    log.warning("warning: anvil: Redis unavailable, admitting [%s]: %s",
                                address, exc)
            except OSError as exc:  # out of descriptors or memory: nothing to serve with
                if self.local_trouble():
                    log.warning("warning: anvil: cannot check [%s]: %s; closing",
                                address, exc.strerror or exc)
                transport.abort()
                return

        def release() -> None:
            if connection:
                _in_background(self.anvil.release(address, connection))

        if transport.is_closing() or self._eof:  # the client left while we asked
            release()
            transport.close()
            return
        if verdict != ADMITTED:
            limit = "count" if verdict == TOO_MANY_CONNECTIONS else "rate"
            log.warning("warning: Connection %s limit exceeded for [%s]", limit, address)
            metrics.ODMR_REFUSED_CONNECTIONS.labels(limit).inc()
            transport.write(f"{replies.TOO_MANY_CONNECTIONS}\r\n".encode())
            transport.close()
            return
        protocol = self.make(release)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if isinstance(protocol, asyncio.Protocol):
            for data in self._early:
                protocol.data_received(data)
        transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """Lost before the verdict: :meth:`_decide` sees the closed transport."""


# Tasks in flight need a reference until they end.
_background: set[asyncio.Task[None]] = set()


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _background.add(task)
    task.add_done_callback(_background.discard)

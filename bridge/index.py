"""The Redis index of held mail: one method per atomic state change.

Redis is the index operators monitor; the spool is the record.  Every
message state change here is a single Lua script (``lua/``) or a single
command, so a crash never leaves a half-indexed message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from importlib import resources
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, WatchError

from odmr_bridge import keys
from odmr_bridge.redis_topology import AsyncClient
from odmr_bridge.spool import Envelope

# Attempts of a stats recount before giving up to busy intake.
RECOUNT_TRIES = 5
# Scripts run at once on a cluster (each takes a connection to its node).
CLUSTER_BATCH = 32


def load_script(name: str) -> str:
    return resources.files("odmr_bridge").joinpath("lua", name).read_text()


@dataclasses.dataclass(frozen=True)
class IndexedMessage:
    qid: str
    domain: str
    arrival: float
    size: int
    sender: str
    recipients: list[tuple[str, str]]  # (address, state)
    queue: str = "deferred"  # or "hold" (by the operator); "bounce" for a notice (spool only)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _recipients_json(envelope: Envelope) -> str:
    return json.dumps([[r.address, r.state] for r in envelope.recipients])


class Index:
    def __init__(self, client: AsyncClient, owner: str = "") -> None:
        self.redis = client
        # The node whose lease tokens these are ('' for an operator command).
        self.owner = owner
        self._add: AsyncScript = client.register_script(load_script("index_add.lua"))
        self._remove: AsyncScript = client.register_script(load_script("index_remove.lua"))
        # A script, not SET NX: it also works at maxmemory (see the script).
        self._acquire: AsyncScript = client.register_script(load_script("lease_acquire.lua"))
        self._renew: AsyncScript = client.register_script(load_script("lease_renew.lua"))
        self._release: AsyncScript = client.register_script(load_script("lease_release.lua"))
        self._move: AsyncScript = client.register_script(load_script("index_move.lua"))
        self._free: AsyncScript = client.register_script(load_script("lease_free_owner.lua"))

    async def prepare(self) -> None:
        """Load the Lua scripts into Redis up front, so no state change meets NOSCRIPT."""
        for script in (self._add, self._remove, self._acquire, self._renew, self._release,
                       self._move, self._free):
            await self.redis.script_load(script.script)

    # -- message state ---------------------------------------------------

    async def add(self, envelope: Envelope, *, held: bool = False) -> bool:
        return (await self.add_many([envelope], held=held))[0]

    async def add_many(self, envelopes: list[Envelope], *, held: bool = False) -> list[bool]:
        """Index several messages in two round trips; True for each one not
        indexed before."""
        # The one global key, in its own command (a script may touch one slot
        # only): first, so a domain with mail is always listed; a listed domain
        # without mail is harmless.
        await self.redis.sadd(keys.DOMAINS, *{envelope.domain for envelope in envelopes})
        added = await self._each(self._add, [
            ([keys.hold(e.domain) if held else keys.deferred(e.domain),
              keys.message(e.domain, e.qid), keys.stats(e.domain)],
             [e.qid, repr(e.arrival), e.size, e.sender, _recipients_json(e),
              "hold" if held else ""])
            for e in envelopes])
        return [bool(a) for a in added]

    async def move(self, domain: str, qid: str, *, hold: bool) -> bool:
        """Put an indexed message on hold (or release it); False if it was not there."""
        source, target = keys.deferred(domain), keys.hold(domain)
        if not hold:
            source, target = target, source
        moved = await self._move(keys=[source, target, keys.message(domain, qid)],
                                 args=[qid, "hold" if hold else ""])
        return bool(moved)

    async def mark_warned(self, domain: str, qid: str) -> None:
        await self.redis.hset(keys.message(domain, qid), "warned", "1")

    async def update_recipients(self, envelope: Envelope) -> None:
        await self.redis.hset(keys.message(envelope.domain, envelope.qid),
                              "rcpts", _recipients_json(envelope))

    @staticmethod
    def _removal_keys(domain: str, qid: str) -> list[str]:
        return [keys.deferred(domain), keys.hold(domain), keys.message(domain, qid),
                keys.stats(domain)]

    async def remove(self, domain: str, qid: str) -> bool:
        removed = await self._remove(keys=self._removal_keys(domain, qid), args=[qid])
        return bool(removed)

    async def remove_many(self, messages: list[tuple[str, str]]) -> None:
        """Drop several (domain, qid) entries in one round trip, each atomically."""
        await self._each(self._remove, [(self._removal_keys(domain, qid), [qid])
                                        for domain, qid in messages])

    async def _each(self, script: AsyncScript, calls: list[tuple[list[str], list[Any]]]
                    ) -> list[Any]:
        """*script* once per (keys, args), each in its own slot: pipelined on a
        single Redis, concurrent calls (a batch at a time) on a cluster, whose
        pipelines refuse scripts.  A node that does not know the script (a
        replica promoted since :meth:`prepare`) gets it loaded and the calls
        are made again: each script here is idempotent."""
        if isinstance(self.redis, RedisCluster):
            results: list[Any] = []
            for start in range(0, len(calls), CLUSTER_BATCH):
                results += await asyncio.gather(*(
                    script(keys=names, args=args)
                    for names, args in calls[start:start + CLUSTER_BATCH]))
            return results
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for names, args in calls:
                pipe.evalsha(script.sha, len(names), *names, *args)
            try:
                return list(await pipe.execute())
            except NoScriptError:
                if attempt:
                    raise
                await self.redis.script_load(script.script)
        raise AssertionError("unreachable")

    # -- reading -----------------------------------------------------------

    async def domains(self) -> list[str]:
        return sorted(_text(m) for m in await self.redis.smembers(keys.DOMAINS))

    async def queued_ids(self, domain: str, limit: int | None = None) -> list[str]:
        """Messages of *domain* that ATRN delivers (not those on hold), oldest first."""
        end = -1 if limit is None else limit - 1
        raw: list[Any] = await self.redis.zrange(keys.deferred(domain), 0, end)
        return [_text(q) for q in raw]

    async def held_ids(self, domain: str) -> list[str]:
        """Messages of *domain* on hold by the operator."""
        raw: list[Any] = await self.redis.zrange(keys.hold(domain), 0, -1)
        return [_text(q) for q in raw]

    async def arrived_before(self, domain: str, cutoff: float) -> list[str]:
        """Deliverable messages of *domain* that arrived before *cutoff* (unix time)."""
        raw: list[Any] = await self.redis.zrangebyscore(keys.deferred(domain), "-inf",
                                                        f"({cutoff!r}")
        return [_text(q) for q in raw]

    async def oldest(self, domains: list[str]) -> dict[str, float]:
        """Arrival of each domain's oldest deliverable message (if any); one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for domain in domains:
            pipe.zrange(keys.deferred(domain), 0, 0, withscores=True)
        return {domain: float(first[0][1])
                for domain, first in zip(domains, await pipe.execute(), strict=True) if first}

    async def warned(self, domain: str, qids: list[str]) -> list[bool]:
        """For each message: has its sender had a delay warning?"""
        pipe = self.redis.pipeline(transaction=False)
        for qid in qids:
            pipe.hexists(keys.message(domain, qid), "warned")
        return [bool(x) for x in await pipe.execute()]

    async def count(self, domain: str) -> int:
        return int(await self.redis.zcard(keys.deferred(domain)))

    async def messages(self, domain: str) -> list[IndexedMessage]:
        """Every indexed message of *domain* (deliverable and on hold), oldest first."""
        qids = await self.queued_ids(domain) + await self.held_ids(domain)
        pipe = self.redis.pipeline(transaction=False)
        for qid in qids:
            pipe.hgetall(keys.message(domain, qid))
        found: list[IndexedMessage] = []
        for qid, raw in zip(qids, await pipe.execute(), strict=True):
            if not raw:
                continue
            fields = {_text(k): _text(v) for k, v in raw.items()}
            found.append(IndexedMessage(
                qid=qid, domain=domain, arrival=float(fields["arrival"]),
                size=int(fields["size"]), sender=fields["sender"],
                recipients=[(a, s) for a, s in json.loads(fields["rcpts"])],
                queue=fields.get("queue", "deferred"),
            ))
        found.sort(key=lambda m: m.arrival)
        return found

    async def stats(self, domain: str) -> dict[str, int]:
        raw: dict[Any, Any] = await self.redis.hgetall(keys.stats(domain))
        return {_text(k): int(v) for k, v in raw.items()}

    # -- leases: one ATRN session per domain -------------------------------

    def new_token(self) -> str:
        """A lease token; it names its owner node, if any: ``<node>#<random>``."""
        random = secrets.token_hex(16)
        return f"{self.owner}#{random}" if self.owner else random

    async def acquire(self, domain: str, token: str, ttl_seconds: float) -> bool:
        return bool(await self._acquire(keys=[keys.lease(domain)],
                                        args=[token, int(ttl_seconds * 1000)]))

    async def renew(self, domain: str, token: str, ttl_seconds: float) -> bool:
        return bool(await self._renew(keys=[keys.lease(domain)],
                                      args=[token, int(ttl_seconds * 1000)]))

    async def release(self, domain: str, token: str) -> bool:
        return bool(await self._release(keys=[keys.lease(domain)], args=[token]))

    async def free_own_leases(self, domains: list[str]) -> list[str]:
        """At start-up: drop the leases of *domains* that this node's previous run
        held (its sessions are gone); one script per domain (one slot each)."""
        if not self.owner:
            return []
        results = await self._each(self._free, [([keys.lease(domain)], [f"{self.owner}#"])
                                                for domain in domains])
        return [d for d, freed in zip(domains, results, strict=True) if freed]

    # -- maintenance ---------------------------------------------------------

    async def recount(self, domain: str) -> bool:
        """Set the domain's stats from its indexed messages; False if intake kept
        changing the domain meanwhile (the stats are then left as they were).

        A WATCH on both sets makes the write conditional: any message indexed
        or dropped in between (the only changes to a size) retries the count.
        """
        sets = [keys.deferred(domain), keys.hold(domain)]
        async with self.redis.pipeline(transaction=True) as watched:
            for _ in range(RECOUNT_TRIES):
                try:
                    await watched.watch(*sets)
                    qids = await self.queued_ids(domain) + await self.held_ids(domain)
                    reads = self.redis.pipeline(transaction=False)
                    for qid in qids:
                        reads.hget(keys.message(domain, qid), "size")
                    sizes = [int(s) for s in await reads.execute() if s is not None]
                    watched.multi()  # type: ignore[no-untyped-call]
                    watched.hset(keys.stats(domain),
                                 mapping={"messages": len(sizes), "bytes": sum(sizes)})
                    await watched.execute()
                    return True
                except WatchError:
                    continue
        return False

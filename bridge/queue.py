"""The hold queue: the spool (the record) and the Redis index together.

Order of writes, so that no crash loses mail:
  commit: spool first (durable), then index; an index failure removes the
          unacknowledged files again and the caller answers 4xx.
  settle: spool first, then index; an index left stale by a crash is
          mended by :meth:`HoldQueue.reindex` (run by ``serve`` at start-up)
          or lazily when a stale entry is met.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator

from bridge.index import Index
from bridge.spool import (
    DELIVERED,
    FAILED,
    PENDING,
    CorruptQueueFile,
    Envelope,
    Readable,
    Recipient,
    Spool,
    UnknownQueueId,
    new_qid,
)

log = logging.getLogger("bridge.queue")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The customer's final answer for one recipient."""

    state: str  # DELIVERED, FAILED or PENDING (deferred: stays held)
    reply: str


@dataclasses.dataclass(frozen=True)
class ReindexReport:
    messages: int
    domains: int
    corrupt: int


class HoldQueue:
    def __init__(self, spool: Spool, index: Index) -> None:
        self.spool = spool
        self.index = index
        self._unsynced: list[tuple[str, str]] = []

    async def commit(
        self,
        sender: str,
        mail_options: list[str],
        recipients_by_domain: dict[str, list[Recipient]],
        body: bytes,
    ) -> dict[str, str]:
        """Hold *body* once per domain; return domain -> queue ID.

        When this returns, every copy is on stable storage and indexed.
        """
        now = time.time()
        envelopes = [
            Envelope(qid=new_qid(now), domain=domain, sender=sender, arrival=now,
                     size=len(body), recipients=rcpts, mail_options=list(mail_options))
            for domain, rcpts in recipients_by_domain.items()
        ]
        await asyncio.to_thread(self.spool.commit, [(e, body) for e in envelopes])
        try:
            for envelope in envelopes:
                await self.index.add(envelope)
        except BaseException:
            await asyncio.to_thread(self._discard, envelopes)
            raise
        return {e.domain: e.qid for e in envelopes}

    def _discard(self, envelopes: list[Envelope]) -> None:
        for envelope in envelopes:
            self.spool.path(envelope.qid).unlink(missing_ok=True)

    async def held(self, domain: str) -> list[str]:
        return await self.index.queued_ids(domain)

    @contextlib.asynccontextmanager
    async def checkout(self, domain: str,
                       qid: str) -> AsyncIterator[tuple[Envelope, Readable] | None]:
        """A held message opened for delivery: (envelope, body), or None.

        None when the index entry was stale (the file is gone: the entry is
        dropped), the file is corrupt (moved to corrupt/), or nothing is
        pending.  The open is synchronous: a header read from the page cache
        costs less than a thread hop.
        """
        reader = self.spool.open_body(qid)
        try:
            body, envelope = reader.__enter__()
        except UnknownQueueId:
            log.warning("%s: in the index but not on the spool; dropping index entry", qid)
            await self.index.remove(domain, qid)
            yield None
            return
        except CorruptQueueFile as exc:
            log.error("%s: moved to corrupt: %s", qid, exc)
            await asyncio.to_thread(self.spool.quarantine, qid)
            await self.index.remove(domain, qid)
            yield None
            return
        try:
            yield (envelope, body) if envelope.pending() else None
        finally:
            reader.__exit__(None, None, None)

    async def load(self, domain: str, qid: str) -> Envelope | None:
        """The envelope of a held message with pending recipients, or None."""
        async with self.checkout(domain, qid) as found:
            return None if found is None else found[0]

    async def settle(self, envelope: Envelope, outcomes: dict[str, Outcome]) -> None:
        """Record the customer's answers for some recipients of *envelope*."""
        changed = False
        for rcpt in envelope.recipients:
            outcome = outcomes.get(rcpt.address)
            if rcpt.state != PENDING or outcome is None:
                continue
            if outcome.state in (DELIVERED, FAILED):
                rcpt.state = outcome.state
                changed = True
            rcpt.reason = outcome.reply
        if not changed:
            return
        if envelope.pending():
            await asyncio.to_thread(self.spool.rewrite, envelope)
            await self.index.update_recipients(envelope)
        elif any(r.state == FAILED for r in envelope.recipients):
            await asyncio.to_thread(self.spool.retire, envelope)
            await self.index.remove(envelope.domain, envelope.qid)
        else:
            # All delivered: unlink now; the directory fsync and the index
            # update follow at the next sync(), batched.  A stale index entry
            # meanwhile is harmless: checkout() drops entries without a file.
            self.spool.retire(envelope, sync=False)
            self._unsynced.append((envelope.domain, envelope.qid))

    async def sync(self) -> None:
        """Make the removals since the last sync durable and drop them from the index."""
        if self._unsynced:
            done, self._unsynced = self._unsynced, []
            await asyncio.to_thread(self.spool.sync_deferred)
            await self.index.remove_many(done)

    async def reindex(self) -> ReindexReport:
        """Rebuild the whole index from the spool (the record)."""
        by_domain: dict[str, list[Envelope]] = defaultdict(list)
        corrupt = 0
        for qid in await asyncio.to_thread(lambda: list(self.spool.deferred_ids())):
            try:
                envelope = await asyncio.to_thread(self.spool.read_envelope, qid)
            except UnknownQueueId:
                continue
            except CorruptQueueFile as exc:
                log.error("%s: moved to corrupt: %s", qid, exc)
                await asyncio.to_thread(self.spool.quarantine, qid)
                corrupt += 1
                continue
            by_domain[envelope.domain].append(envelope)
        domains = set(by_domain) | set(await self.index.domains())
        for domain in sorted(domains):
            await self.index.forget_domain(domain)
            for envelope in by_domain.get(domain, []):
                await self.index.add(envelope)
        total = sum(len(v) for v in by_domain.values())
        return ReindexReport(messages=total, domains=len(by_domain), corrupt=corrupt)

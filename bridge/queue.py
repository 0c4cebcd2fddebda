"""The hold queue: the spool (the record) and the Redis index together.

Order of writes, so that no crash loses mail:
  commit: spool first (durable), then index; an index failure removes the
          unacknowledged files again and the caller answers 4xx.
  settle: the notice for the sender (bounce) first, then the message's new
          state, then the index.  A crash in between can repeat a notice or
          a delivery, never lose either.  An index left stale by a crash is
          mended by :meth:`HoldQueue.reindex` (run by ``serve`` at start-up)
          or lazily when a stale entry is met.

State changes outside an ATRN session (expiry, operator commands) take the
domain's lease first, so they never race a delivery of the same message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import IO

from odmr_bridge.dsn import notify_wants
from odmr_bridge.index import Index
from odmr_bridge.leases import LeaseKeeper
from odmr_bridge.spool import (
    BOUNCE,
    DEFERRED,
    DELIVERED,
    FAILED,
    HOLD,
    PENDING,
    Content,
    CorruptQueueFile,
    Envelope,
    Readable,
    Recipient,
    Spool,
    UnknownQueueId,
    new_qid,
)

log = logging.getLogger("odmr_bridge.queue")

# Lease time of an operator command or a queue pass on a domain (renewed while it runs).
EXCLUSIVE_SECONDS = 60.0

# Which NOTIFY word asks for a notice about a recipient in this state.
_NOTIFY_EVENT = {FAILED: "FAILURE", PENDING: "DELAY", DELIVERED: "SUCCESS"}
_NOTICE_NAME = {FAILED: "non-delivery", PENDING: "delay", DELIVERED: "delivery status"}


class DomainBusy(Exception):
    """An ATRN session (or another operator command) is working on the domain."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The customer's final answer for one recipient."""

    state: str  # DELIVERED, FAILED or PENDING (deferred: stays held)
    reply: str


@dataclasses.dataclass
class ReindexReport:
    messages: int  # found on the spool
    domains: int
    corrupt: int
    added: int = 0  # files that had no index entry
    removed: int = 0  # index entries whose file was gone
    busy: list[str] = dataclasses.field(default_factory=list)  # domains not mended


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
        body: bytes | IO[bytes],
        trace: Callable[[str, list[Recipient]], bytes] = lambda qid, rcpts: b"",
    ) -> dict[str, Envelope]:
        """Hold *body* once per domain; return domain -> the copy's envelope.

        *trace* gives the header lines to put in front of one copy, from its
        queue ID and recipients (our ``Received:``).  When this returns, every
        copy is on stable storage and indexed.
        """
        now = time.time()
        copies: list[tuple[Envelope, bytes | Content]] = []
        for domain, rcpts in recipients_by_domain.items():
            qid = new_qid(now)
            content = Content(trace(qid, rcpts), body)
            copies.append((Envelope(qid=qid, domain=domain, sender=sender, arrival=now,
                                    size=content.size, recipients=rcpts,
                                    mail_options=list(mail_options)), content))
        envelopes = [envelope for envelope, _ in copies]
        await asyncio.to_thread(self.spool.commit, copies)
        try:
            for envelope in envelopes:
                await self.index.add(envelope)
        except BaseException:
            await asyncio.to_thread(self._discard, envelopes)
            raise
        return {e.domain: e for e in envelopes}

    def _discard(self, envelopes: list[Envelope]) -> None:
        for envelope in envelopes:
            self.spool.path(envelope.qid).unlink(missing_ok=True)

    def scratch(self) -> IO[bytes]:
        """Where intake puts DATA as it arrives, before :meth:`commit`."""
        return self.spool.scratch()

    async def held(self, domain: str) -> list[str]:
        return await self.index.queued_ids(domain)

    @contextlib.asynccontextmanager
    async def exclusive(self, domain: str) -> AsyncIterator[LeaseKeeper]:
        """Keep ATRN sessions off *domain* while the block runs; DomainBusy if one is on it.

        The lease is renewed while the block runs; a long block checks
        ``lease.lost`` between steps.
        """
        lease = LeaseKeeper(self.index, EXCLUSIVE_SECONDS)
        if not await lease.acquire([domain]):
            raise DomainBusy(f"{domain} is being collected by an ATRN session right now")
        try:
            yield lease
        finally:
            await lease.release()

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
            if envelope.pending():
                reader.__exit__(None, None, None)
            else:
                # Delivered and unlinked: the last close frees the file, the
                # costliest step of a delivery; let a worker thread pay it
                # while the next message goes out.
                asyncio.get_running_loop().run_in_executor(None, reader.__exit__, None, None,
                                                           None)

    async def load(self, domain: str, qid: str) -> Envelope | None:
        """The envelope of a held message with pending recipients, or None."""
        async with self.checkout(domain, qid) as found:
            return None if found is None else found[0]

    async def settle(self, envelope: Envelope, outcomes: dict[str, Outcome], *,
                     report_success: bool = False) -> None:
        """Record final answers for some recipients of a deferred message.

        Recipients that failed get a non-delivery notice for the sender (as
        their NOTIFY asks); with *report_success* (the customer's MTA does not
        offer DSN) so do delivered recipients whose NOTIFY includes SUCCESS.
        """
        final: list[Recipient] = []
        for rcpt in envelope.recipients:
            outcome = outcomes.get(rcpt.address)
            if rcpt.state != PENDING or outcome is None:
                continue
            rcpt.reason = outcome.reply
            if outcome.state in (DELIVERED, FAILED):
                rcpt.state = outcome.state
                final.append(rcpt)
        if not final:
            return
        failed = [r for r in final if r.state == FAILED]
        relayed = [r for r in final if r.state == DELIVERED and report_success]
        await self.notify(envelope, failed)
        await self.notify(envelope, relayed)
        if envelope.pending():
            await asyncio.to_thread(self.spool.rewrite, envelope)
            await self.index.update_recipients(envelope)
        else:
            # All final: unlink now; the directory fsync and the index update
            # follow at the next sync(), batched.  A stale index entry
            # meanwhile is harmless: checkout() drops entries without a file.
            self.spool.remove(envelope.qid, sync=False)
            self._unsynced.append((envelope.domain, envelope.qid))
            log.info("%s: removed", envelope.qid)

    async def notify(self, envelope: Envelope, recipients: list[Recipient]) -> str | None:
        """Queue a delivery status notification to the sender about *recipients*
        of the deferred message *envelope*.

        Their state says what is reported (failed, delayed, relayed).  Nothing
        is queued for the null sender, nor for recipients whose NOTIFY does
        not ask for it.  Returns the notice's ID, if one was queued.
        """
        wanted = [Recipient(r.address, list(r.options), r.state, r.reason) for r in recipients
                  if notify_wants(r.options, _NOTIFY_EVENT[r.state])]
        if not wanted or not envelope.sender:
            return None
        notice = dataclasses.replace(envelope, qid=new_qid(), recipients=wanted,
                                     about=envelope.qid)
        # Only deliverable messages are settled, expired or warned about.
        await asyncio.to_thread(self.spool.place, notice, envelope.qid, DEFERRED, BOUNCE)
        log.info("%s: sender %s notification: %s", envelope.qid,
                 _NOTICE_NAME[wanted[0].state], notice.qid)
        return notice.qid

    async def sync(self) -> None:
        """Make the removals since the last sync durable and drop them from the index."""
        if self._unsynced:
            done, self._unsynced = self._unsynced, []
            await asyncio.to_thread(self.spool.sync)
            await self.index.remove_many(done)

    def _ids(self, queue: str) -> list[str]:
        return list(self.spool.ids(queue))

    async def reindex(self, *, wait: float = 0.0) -> ReindexReport:
        """Mend the index from the spool (the record); safe while the daemon serves.

        Add-only for what the scan finds: a file without an index entry is
        indexed (an entry already there is left as is), and an entry is
        dropped only if its file is gone when it is dropped, so mail
        committed during the scan is never hidden.  Each domain is mended
        under its lease, waiting up to *wait* seconds for it; a domain still
        busy after that is left as it is and named in the report.
        """
        found: dict[str, set[str]] = defaultdict(set)
        corrupt = 0
        for queue in (DEFERRED, HOLD):
            for qid in await asyncio.to_thread(self._ids, queue):
                try:
                    envelope = await asyncio.to_thread(self.spool.read_envelope, qid, queue)
                except UnknownQueueId:
                    continue
                except CorruptQueueFile as exc:
                    log.error("%s: moved to corrupt: %s", qid, exc)
                    await asyncio.to_thread(self.spool.quarantine, qid, queue)
                    corrupt += 1
                    continue
                found[envelope.domain].add(qid)
        report = ReindexReport(messages=sum(len(q) for q in found.values()),
                               domains=len(found), corrupt=corrupt)
        loop = asyncio.get_running_loop()
        for domain in sorted(set(found) | set(await self.index.domains())):
            deadline = loop.time() + wait
            while True:
                try:
                    async with self.exclusive(domain) as lease:
                        await self._mend(domain, found.get(domain, set()), lease, report)
                    break
                except DomainBusy:
                    if loop.time() >= deadline:
                        log.warning("%s: not reindexed: being collected", domain)
                        report.busy.append(domain)
                        break
                    await asyncio.sleep(0.1)
        return report

    async def _mend(self, domain: str, found: set[str], lease: LeaseKeeper,
                    report: ReindexReport) -> None:
        indexed = set(await self.index.queued_ids(domain)) | set(await self.index.held_ids(domain))
        for qid in sorted(found - indexed):
            if lease.lost:
                raise DomainBusy(domain)
            # Read again under the lease: the file may have changed since the scan.
            current = await asyncio.to_thread(self._current, qid)
            if current is None:
                continue
            envelope, queue = current
            if await self.index.add(envelope, held=queue == HOLD):
                report.added += 1
                if envelope.warned:
                    await self.index.mark_warned(domain, qid)
        for qid in sorted(indexed - found):
            if lease.lost:
                raise DomainBusy(domain)
            # Committed after the scan, or moved meanwhile: still on the spool.
            gone = not await asyncio.to_thread(self._on_spool, qid)
            if gone and await self.index.remove(domain, qid):
                report.removed += 1
        if not await self.index.recount(domain):
            log.warning("%s: stats not recounted: intake too busy", domain)

    def _current(self, qid: str) -> tuple[Envelope, str] | None:
        """The envelope of held message *qid* and its queue, as on the spool now."""
        for queue in (DEFERRED, HOLD):
            try:
                return self.spool.read_envelope(qid, queue), queue
            except UnknownQueueId:
                continue
            except CorruptQueueFile as exc:
                log.error("%s: moved to corrupt: %s", qid, exc)
                self.spool.quarantine(qid, queue)
                return None
        return None

    def _on_spool(self, qid: str) -> bool:
        try:
            return any(self.spool.path(qid, queue).exists() for queue in (DEFERRED, HOLD))
        except UnknownQueueId:  # not even a queue ID
            return False

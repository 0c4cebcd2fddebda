"""The hold queue: the store (the record) and the Redis index together.

``HoldQueue`` is the only code that changes stored messages: intake, the
relay, the queue pass (lifecycle.py) and the operator's commands
(queue_tools.py, cli.py) call its methods and nothing under it.  The store
(``store.py``: :class:`~odmr_bridge.store.FilesStore` on the spool) keeps
envelopes and content; the index (``index.py``) lists and counts them.

Order of writes, so that no crash loses mail:
  commit: spool first (durable), then index; an index failure removes the
          unacknowledged files again and the caller answers 4xx.
  settle: the notice for the sender (bounce) first, then the message's new
          state, then the index.  A crash in between can repeat a notice or
          a delivery, never lose either.  An index left stale by a crash is
          mended by :meth:`HoldQueue.reindex` (run by ``serve`` at start-up)
          or lazily when a stale entry is met.

State changes outside an ATRN session (expiry, warnings, operator commands)
run under the domain's lease (:meth:`HoldQueue.exclusive`), so they never
race a delivery of the same message.
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
from odmr_bridge.group_commit import GroupCommit
from odmr_bridge.index import Index, IndexedMessage
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
from odmr_bridge.store import FilesStore, Store

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
    """Held mail: every change to a stored message goes through these methods.

    Intake: :meth:`scratch`, :meth:`commit`.  Delivery: :meth:`held`,
    :meth:`checkout`, :meth:`settle`, :meth:`sync`, :meth:`leases`.  The
    queue pass: :meth:`due_domains`, :meth:`arrived_before`, :meth:`unwarned`,
    :meth:`expire`, :meth:`warn`, :meth:`waiting_notices`,
    :meth:`open_notice`, :meth:`remove_notice`.  Operators: :meth:`locate`, :meth:`show`,
    :meth:`hold`, :meth:`release`, :meth:`delete`, :meth:`requeue`,
    :meth:`reindex`, and the read-only :meth:`domains`, :meth:`messages`,
    :meth:`on_hold`, :meth:`count`, :meth:`stats`, :meth:`notices`.

    The ``store`` and ``index`` attributes are this module's: other modules
    never reach through them (tests/test_queue_owner.py checks).
    """

    def __init__(self, store: Store | Spool, index: Index) -> None:
        self.store: Store = FilesStore(store) if isinstance(store, Spool) else store
        self.index = index
        self._unsynced: list[tuple[str, str]] = []
        # Intakes that finish together are made durable together (one batch).
        self._group_commit = GroupCommit[list[tuple[Envelope, Content]]](self._commit_together)

    async def prepare(self) -> None:
        """Ready the index (its scripts loaded) before the first state change."""
        await self.index.prepare()

    # -- intake -------------------------------------------------------------

    def scratch(self) -> IO[bytes]:
        """Where intake puts DATA as it arrives, before :meth:`commit`."""
        return self.store.scratch()

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
        copies: list[tuple[Envelope, Content]] = []
        for domain, rcpts in recipients_by_domain.items():
            qid = new_qid(now)
            content = Content(trace(qid, rcpts), body)
            copies.append((Envelope(qid=qid, domain=domain, sender=sender, arrival=now,
                                    size=content.size, recipients=rcpts,
                                    mail_options=list(mail_options)), content))
        await self._group_commit(copies)
        return {envelope.domain: envelope for envelope, _ in copies}

    async def _commit_together(self, batches: list[list[tuple[Envelope, Content]]]) -> None:
        """Make the copies of several intakes durable and indexed, all or none."""
        copies = [copy for batch in batches for copy in batch]
        envelopes = [envelope for envelope, _ in copies]
        await self.store.write(copies)
        try:
            await self.index.add_many(envelopes)
        except BaseException:
            for envelope in envelopes:  # unacknowledged: the callers answer 4xx
                await self.store.remove(envelope.domain, envelope.qid)
            raise

    # -- delivery -------------------------------------------------------------

    async def held(self, domain: str) -> list[str]:
        """Deliverable messages of *domain* (not on hold), oldest first."""
        return await self.index.queued_ids(domain)

    def leases(self, ttl: float) -> LeaseKeeper:
        """A keeper of ATRN leases (one session per domain) on this queue's index."""
        return LeaseKeeper(self.index, ttl)

    async def free_own_leases(self, domains: list[str]) -> list[str]:
        """At start-up: free the leases this node's previous run held on *domains*."""
        return await self.index.free_own_leases(domains)

    @contextlib.asynccontextmanager
    async def exclusive(self, domain: str) -> AsyncIterator[LeaseKeeper]:
        """Keep ATRN sessions off *domain* while the block runs; DomainBusy if one is on it.

        The lease is renewed while the block runs; a long block checks
        ``lease.lost`` between steps.
        """
        lease = self.leases(EXCLUSIVE_SECONDS)
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

        None when the index entry was stale (the message is gone: the entry
        is dropped), the message is corrupt (quarantined), or nothing is
        pending.
        """
        opened = self.store.open(domain, qid)
        try:
            body, envelope = await opened.__aenter__()
        except UnknownQueueId:
            log.warning("%s: in the index but not on the spool; dropping index entry", qid)
            await self.index.remove(domain, qid)
            yield None
            return
        except CorruptQueueFile as exc:
            log.error("%s: moved to corrupt: %s", qid, exc)
            await self.store.quarantine(domain, qid)
            await self.index.remove(domain, qid)
            yield None
            return
        try:
            yield (envelope, body) if envelope.pending() else None
        finally:
            await opened.__aexit__(None, None, None)

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
            await self.store.rewrite(envelope)
            await self.index.update_recipients(envelope)
        else:
            # All final: remove now; durability and the index update follow
            # at the next sync(), batched.  A stale index entry meanwhile is
            # harmless: checkout() drops entries without a message.
            await self.store.remove(envelope.domain, envelope.qid, sync=False)
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
        await self.store.copy(notice, envelope.qid, DEFERRED, BOUNCE)
        log.info("%s: sender %s notification: %s", envelope.qid,
                 _NOTICE_NAME[wanted[0].state], notice.qid)
        return notice.qid

    async def sync(self) -> None:
        """Make the removals since the last sync durable and drop them from the index."""
        if self._unsynced:
            done, self._unsynced = self._unsynced, []
            await self.store.sync()
            if not self.store.keeps_index:  # else the store's removals did it
                await self.index.remove_many(done)

    # -- the queue pass: expiry and delay warnings -----------------------------

    async def due_domains(self, cutoff: float) -> list[str]:
        """Domains whose oldest deliverable message arrived before *cutoff*."""
        oldest = await self.index.oldest(await self.index.domains())
        return sorted(d for d, arrival in oldest.items() if arrival < cutoff)

    async def arrived_before(self, domain: str, cutoff: float) -> list[str]:
        """Deliverable messages of *domain* that arrived before *cutoff* (unix time)."""
        return await self.index.arrived_before(domain, cutoff)

    async def unwarned(self, domain: str, qids: list[str]) -> list[str]:
        """Those of *qids* whose sender has had no delay warning yet."""
        warned = await self.index.warned(domain, qids)
        return [qid for qid, done in zip(qids, warned, strict=True) if not done]

    async def expire(self, envelope: Envelope, reply: str) -> None:
        """Fail every pending recipient of a checked-out message with *reply*
        (their last reply appended) and queue the non-delivery notice; the
        message is then removed (see :meth:`settle`).  Under the domain's lease."""
        outcomes = {}
        for rcpt in envelope.pending():
            last = f"; last reply: {rcpt.reason}" if rcpt.reason else ""
            outcomes[rcpt.address] = Outcome(FAILED, f"{reply}{last}")
        await self.settle(envelope, outcomes)

    async def warn(self, envelope: Envelope) -> bool:
        """Queue the one delay warning for a checked-out message and mark it
        sent (notice first, then the message, then the index); False if it
        was sent before.  Under the domain's lease."""
        if envelope.warned:
            return False
        await self.notify(envelope, envelope.pending())
        envelope.warned = True
        await self.store.rewrite(envelope)
        await self.index.mark_warned(envelope.domain, envelope.qid)
        return True

    # -- notices to senders (bounce/) ------------------------------------------

    async def waiting_notices(self) -> list[Envelope]:
        """The notices waiting in bounce/, oldest ID first; a corrupt one is
        quarantined (and logged) instead."""
        found = []
        async for scanned in self.store.scan(BOUNCE):
            if scanned.envelope is None:
                log.error("%s: moved to corrupt: %s", scanned.qid, scanned.problem)
                await self.store.quarantine(scanned.domain, scanned.qid, BOUNCE)
            else:
                found.append(scanned.envelope)
        return sorted(found, key=lambda notice: notice.qid)

    @contextlib.asynccontextmanager
    async def open_notice(self, notice: Envelope) -> AsyncIterator[tuple[Readable, Envelope] |
                                                                    None]:
        """A notice to send: (body of the message it is about, the notice as
        stored now), or None when it was sent meanwhile or is corrupt (then
        quarantined)."""
        opened = self.store.open(notice.domain, notice.qid, BOUNCE)
        try:
            body, current = await opened.__aenter__()
        except UnknownQueueId:
            yield None
            return
        except CorruptQueueFile as exc:
            log.error("%s: moved to corrupt: %s", notice.qid, exc)
            await self.store.quarantine(notice.domain, notice.qid, BOUNCE)
            yield None
            return
        try:
            yield body, current
        finally:
            await opened.__aexit__(None, None, None)

    async def remove_notice(self, notice: Envelope) -> None:
        """The host MTA took the notice (or refused it for good): drop it."""
        await self.store.remove(notice.domain, notice.qid, BOUNCE)

    async def notices(self) -> list[IndexedMessage]:
        """Notices waiting in bounce/, as listing entries: from MAILER-DAEMON to the
        sender, dated when written."""
        return [IndexedMessage(qid=s.qid, domain=s.envelope.domain, arrival=s.stored,
                               size=s.envelope.size, sender="",
                               recipients=[(s.envelope.sender, PENDING)], queue=BOUNCE)
                async for s in self.store.scan(BOUNCE) if s.envelope is not None]

    # -- operators (postsuper, postcat) ------------------------------------------

    async def locate(self, qid: str) -> tuple[str, Envelope]:
        """(queue, envelope) of a message or notice, by ID; UnknownQueueId or
        CorruptQueueFile if there is none or it is damaged."""
        return await self.store.locate(qid)

    async def show(self, qid: str) -> tuple[str, Envelope, bytes]:
        """(queue, envelope, content) of a message or notice, for ``queue show``."""
        where, envelope = await self.store.locate(qid)
        async with self.store.open(envelope.domain, qid, where) as (body, envelope):
            return where, envelope, body.read()

    async def hold(self, envelope: Envelope) -> None:
        """Keep a deferred message from delivery and expiry until released.
        Under the domain's lease (:meth:`exclusive`)."""
        await self.store.move(envelope.domain, envelope.qid, DEFERRED, HOLD)
        await self.index.move(envelope.domain, envelope.qid, hold=True)
        log.info("%s: placed on hold by the operator", envelope.qid)

    async def release(self, envelope: Envelope) -> None:
        """Make a message on hold deliverable again.  Under the domain's lease."""
        await self.store.move(envelope.domain, envelope.qid, HOLD, DEFERRED)
        await self.index.move(envelope.domain, envelope.qid, hold=False)
        log.info("%s: released from hold by the operator", envelope.qid)

    async def delete(self, where: str, envelope: Envelope) -> None:
        """Remove a message (deferred or on hold) or a notice (bounce).  Under
        the domain's lease."""
        await self.store.remove(envelope.domain, envelope.qid, where)
        if where != BOUNCE:  # notices are not indexed
            await self.index.remove(envelope.domain, envelope.qid)
        log.info("%s: removed by the operator", envelope.qid)

    async def requeue(self, where: str, envelope: Envelope) -> str:
        """A fresh copy under a new ID, through the intake path: pending
        recipients only, last replies cleared, clocks restarted, deliverable;
        then the old one goes.  Returns the new ID.  Under the domain's lease."""
        fresh = dataclasses.replace(
            envelope, qid=new_qid(), arrival=time.time(), warned=False,
            recipients=[dataclasses.replace(r, reason="") for r in envelope.recipients
                        if r.state == PENDING])
        await self.store.copy(fresh, envelope.qid, where, DEFERRED)
        await self.index.add(fresh)
        await self.store.remove(envelope.domain, envelope.qid, where)
        await self.index.remove(envelope.domain, envelope.qid)
        log.info("%s: requeued by the operator as %s", envelope.qid, fresh.qid)
        return fresh.qid

    # -- read-only queries -------------------------------------------------------

    async def domains(self) -> list[str]:
        """Every domain with indexed mail."""
        return await self.index.domains()

    async def on_hold(self, domain: str) -> list[str]:
        """Messages of *domain* on hold by the operator."""
        return await self.index.held_ids(domain)

    async def count(self, domain: str) -> int:
        """How many deliverable messages *domain* has."""
        return await self.index.count(domain)

    async def messages(self, domain: str | None = None) -> list[IndexedMessage]:
        """Indexed messages (deliverable and on hold) of *domain*, or of every
        domain, oldest first within a domain."""
        found: list[IndexedMessage] = []
        for d in [domain] if domain else await self.index.domains():
            found.extend(await self.index.messages(d))
        return found

    async def stats(self, domain: str) -> dict[str, int]:
        """The domain's counters: messages and bytes held."""
        return await self.index.stats(domain)

    # -- reindex ---------------------------------------------------------------

    async def reindex(self, *, wait: float = 0.0) -> ReindexReport:
        """Mend the index from the store (the record); safe while the daemon serves.

        Add-only for what the scan finds: a message without an index entry is
        indexed (an entry already there is left as is), and an entry is
        dropped only if its message is gone when it is dropped, so mail
        committed during the scan is never hidden.  Each domain is mended
        under its lease, waiting up to *wait* seconds for it; a domain still
        busy after that is left as it is and named in the report.
        """
        found: dict[str, set[str]] = defaultdict(set)
        corrupt = 0
        for queue in (DEFERRED, HOLD):
            async for scanned in self.store.scan(queue):
                if scanned.envelope is None:
                    log.error("%s: moved to corrupt: %s", scanned.qid, scanned.problem)
                    await self.store.quarantine(scanned.domain, scanned.qid, queue)
                    corrupt += 1
                    continue
                found[scanned.envelope.domain].add(scanned.qid)
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
            # Read again under the lease: the message may have changed since the scan.
            current = await self._current(domain, qid)
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
            # Committed after the scan, or moved meanwhile: still stored.
            gone = not any([await self.store.exists(domain, qid, q) for q in (DEFERRED, HOLD)])
            if gone and await self.index.remove(domain, qid):
                report.removed += 1
        if not await self.index.recount(domain):
            log.warning("%s: stats not recounted: intake too busy", domain)

    async def _current(self, domain: str, qid: str) -> tuple[Envelope, str] | None:
        """The envelope of held message *qid* and its queue, as stored now."""
        for queue in (DEFERRED, HOLD):
            try:
                return await self.store.read_envelope(domain, qid, queue), queue
            except UnknownQueueId:
                continue
            except CorruptQueueFile as exc:
                log.error("%s: moved to corrupt: %s", qid, exc)
                await self.store.quarantine(domain, qid, queue)
                return None
        return None

"""Where held messages are stored: the :class:`Store` protocol and its files
implementation, :class:`FilesStore` (today's spool).

Only :class:`odmr_bridge.queue.HoldQueue` calls a store; everything else asks
the queue.  The store keeps each message's envelope and content; the Redis
index beside it (``index.py``) is what the hold queue lists and counts.
HoldQueue pairs each store write with its index write in the documented order
(``docs/design.md``).

A message is named by its domain and queue ID.  The domain routes: a store
that keeps messages in Redis puts everything of a domain under the domain's
``{domain}`` hash tag (one Redis Cluster slot), so every operation here that
touches one message is given its domain, and a single script can write a
message's pieces together with its index entry.  :class:`FilesStore` ignores
the domain (a queue ID names one file).

Contract for every store:

- Writes are durable when they return: the caller may acknowledge (LMTP 250)
  right after ``write`` and the index update.  Each write is all or nothing:
  a message is either wholly there (envelope and every byte of content) or
  not at all.  A store that replicates confirms the copies before returning
  (``WAIT``) and raises otherwise; a store that is full raises ``OSError``
  (``ENOSPC``) with nothing half-stored.
- Index writes that follow are idempotent (add-only, move-if-there,
  remove-if-there), so a store that indexes inside its own write script may
  do so: HoldQueue's index call afterwards then changes nothing.
- Reads raise :class:`UnknownQueueId` for a message not (or no longer) in the
  named queue and :class:`CorruptQueueFile` for one that fails validation.
- The content stream is a :class:`Readable` whose ``read`` is synchronous
  (the relay and the notice builder read it in pieces); a store that is not
  local fetches pieces ahead of the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import IO, NamedTuple, Protocol

from odmr_bridge.spool import (
    DEFERRED,
    HOLD,
    QUEUES,
    SCRATCH_IN_MEMORY,
    Content,
    CorruptQueueFile,
    Envelope,
    Readable,
    Spool,
    UnknownQueueId,
)

__all__ = ["DEFERRED", "HOLD", "QUEUES", "FilesStore", "Scanned", "Store"]


class Scanned(NamedTuple):
    """One message found by :meth:`Store.scan`."""

    qid: str
    domain: str  # '' when unreadable and the store cannot tell without the envelope
    envelope: Envelope | None  # None: it failed validation (see Store.quarantine)
    stored: float  # when the store wrote this copy (unix time)
    problem: str = ""  # why it failed validation


class Store(Protocol):
    """The operations the hold queue needs from the place messages live.

    Queues are the names in ``spool.QUEUES``: ``deferred`` (waiting for ATRN),
    ``hold`` (the operator's hold) and ``bounce`` (notices to senders).
    """

    # True when the store's own scripts change the index with each message
    # (the redis store): the hold queue then skips its batched index
    # removals after :meth:`sync`, which would only repeat them.
    keeps_index: bool

    def scratch(self) -> IO[bytes]:
        """A file object for intake to stream DATA into before :meth:`write`
        (in memory up to a size, then local disk).  It is read once per copy."""
        ...

    async def write(self, copies: Sequence[tuple[Envelope, Content]]) -> None:
        """Store each new message (envelope + content) in ``deferred``,
        durably, all or none: on failure nothing of any copy remains and the
        error is raised.  Large content must be written in pieces (no single
        command or buffer the size of the message)."""
        ...

    async def copy(self, envelope: Envelope, body_of: str, source: str, target: str) -> None:
        """Store *envelope* in *target* with the content of message *body_of*
        (same domain) in *source*, durably.  A new queue ID makes a new
        message (a notice in ``bounce``, a requeued copy); the same ID and
        queue replaces the message's envelope."""
        ...

    async def rewrite(self, envelope: Envelope, queue: str = DEFERRED) -> None:
        """Replace a message's envelope (recipient states, warned), keeping its
        content, durably and atomically."""
        ...

    async def move(self, domain: str, qid: str, source: str, target: str) -> None:
        """Move a message between queues (hold, release), durably.
        UnknownQueueId if it is not in *source*."""
        ...

    async def remove(self, domain: str, qid: str, queue: str = DEFERRED, *,
                     sync: bool = True) -> None:
        """Drop a message; nothing happens if it is already gone.  With
        ``sync=False`` durability may wait for the next :meth:`sync` (the
        caller batches): until then a crash may bring the message back (a
        duplicate delivery), never lose another."""
        ...

    async def sync(self) -> None:
        """Make the removals made with ``sync=False`` durable.  A store that
        sends them without waiting (and so learns of a failure only later)
        must keep the index itself (``keeps_index``): a removal that failed
        leaves the message stored and indexed."""
        ...

    async def quarantine(self, domain: str, qid: str, queue: str = DEFERRED) -> None:
        """Set a message that failed validation aside for the operator (out of
        every queue, never delivered)."""
        ...

    def open(self, domain: str, qid: str,
             queue: str = DEFERRED) -> AbstractAsyncContextManager[tuple[Readable, Envelope]]:
        """``async with store.open(d, qid) as (content, envelope)``: a validated
        message, its content as a stream.  The envelope is the caller's to
        change; a message whose recipients are all final when the block ends
        has been removed (by :meth:`remove`), and the store may free its
        resources in the background."""
        ...

    async def read_envelope(self, domain: str, qid: str, queue: str = DEFERRED) -> Envelope:
        """The envelope of a message, validated."""
        ...

    async def exists(self, domain: str, qid: str, queue: str) -> bool:
        """Is message *qid* in *queue* now?"""
        ...

    async def locate(self, qid: str) -> tuple[str, Envelope]:
        """(queue, envelope) of message *qid*, by its ID alone: for operator
        commands, which are not on the hot path (a sharded store may have to
        ask every domain)."""
        ...

    def scan(self, queue: str) -> AsyncIterator[Scanned]:
        """Every message in *queue* (for reindex and the notices in
        ``bounce``), in no particular order; messages removed meanwhile are
        skipped; ones that fail validation come with ``envelope=None`` and are
        left where they are."""
        ...


_Opened = contextlib.AbstractContextManager[tuple[Readable, Envelope]]


class FilesStore:
    """The :class:`Store` on the spool directory (``spool.py``): one file per
    message, fsync and rename; the on-disk format is the spool's."""

    keeps_index = False
    # Delivered files are closed this many at a time, on a worker thread.
    CLOSE_BATCH = 32

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._delivered: list[_Opened] = []

    def scratch(self) -> IO[bytes]:
        return self.spool.scratch()

    def _close_delivered(self, reader: _Opened | None = None, size: int = 0) -> None:
        """The last close of a delivered (unlinked) file frees it, the costliest
        step of a delivery: a worker thread closes them in batches while the
        next messages go out (one thread hop per batch, not per message).  A
        large file goes at once, so its disk space is not kept waiting."""
        if reader is not None:
            self._delivered.append(reader)
            if len(self._delivered) < self.CLOSE_BATCH and size < SCRATCH_IN_MEMORY:
                return
        if self._delivered:
            batch, self._delivered = self._delivered, []
            asyncio.get_running_loop().run_in_executor(None, _close_all, batch)

    async def write(self, copies: Sequence[tuple[Envelope, Content]]) -> None:
        await asyncio.to_thread(self.spool.commit, list(copies))

    async def copy(self, envelope: Envelope, body_of: str, source: str, target: str) -> None:
        await asyncio.to_thread(self.spool.place, envelope, body_of, source, target)

    async def rewrite(self, envelope: Envelope, queue: str = DEFERRED) -> None:
        await asyncio.to_thread(self.spool.rewrite, envelope, queue)

    async def move(self, domain: str, qid: str, source: str, target: str) -> None:
        await asyncio.to_thread(self.spool.move, qid, source, target)

    async def remove(self, domain: str, qid: str, queue: str = DEFERRED, *,
                     sync: bool = True) -> None:
        if sync:
            await asyncio.to_thread(self.spool.remove, qid, queue)
        else:
            # An unlink without the directory fsync: cheaper than a thread hop.
            self.spool.remove(qid, queue, sync=False)

    async def sync(self) -> None:
        self._close_delivered()
        await asyncio.to_thread(self.spool.sync)

    async def quarantine(self, domain: str, qid: str, queue: str = DEFERRED) -> None:
        await asyncio.to_thread(self.spool.quarantine, qid, queue)

    @contextlib.asynccontextmanager
    async def open(self, domain: str, qid: str,
                   queue: str = DEFERRED) -> AsyncIterator[tuple[Readable, Envelope]]:
        # Synchronous open: a header read from the page cache costs less than
        # a thread hop.
        reader = self.spool.open_body(qid, queue)
        body, envelope = reader.__enter__()
        try:
            yield body, envelope
        finally:
            if envelope.pending() or queue != DEFERRED:  # notices: no sync() follows
                reader.__exit__(None, None, None)
            else:  # delivered and unlinked
                self._close_delivered(reader, envelope.size)

    async def read_envelope(self, domain: str, qid: str, queue: str = DEFERRED) -> Envelope:
        return await asyncio.to_thread(self.spool.read_envelope, qid, queue)

    async def exists(self, domain: str, qid: str, queue: str) -> bool:
        try:
            return await asyncio.to_thread(self.spool.path(qid, queue).exists)
        except UnknownQueueId:  # not even a queue ID
            return False

    async def locate(self, qid: str) -> tuple[str, Envelope]:
        return await asyncio.to_thread(self._locate, qid)

    def _locate(self, qid: str) -> tuple[str, Envelope]:
        where = self.spool.find(qid)
        return where, self.spool.read_envelope(qid, where)

    async def scan(self, queue: str) -> AsyncIterator[Scanned]:
        for qid in await asyncio.to_thread(lambda: list(self.spool.ids(queue))):
            try:
                yield await asyncio.to_thread(self._scanned, qid, queue)
            except UnknownQueueId:
                continue

    def _scanned(self, qid: str, queue: str) -> Scanned:
        try:
            with self.spool.open_body(qid, queue) as (_, envelope):
                stored = os.stat(self.spool.path(qid, queue)).st_mtime
        except FileNotFoundError:
            raise UnknownQueueId(qid) from None
        except CorruptQueueFile as exc:
            return Scanned(qid, "", None, 0.0, str(exc))
        return Scanned(qid, envelope.domain, envelope, stored)


def _close_all(readers: list[_Opened]) -> None:
    for reader in readers:
        reader.__exit__(None, None, None)

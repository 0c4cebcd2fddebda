"""The ``redis`` store: held messages live in Redis beside their index entries.

Every key of a message is under its domain's hash tag (keys.py), so one
script stores a message, its pieces and its index entry together, and every
later state change is one script in that slot:

- the message is a STRING ``bridge:{d}:q:<queue>:<qid>``: a header line
  ``<stored> <pieces> <envelope length>``, the envelope JSON, then the first
  bytes of the content;
- the rest of the content is in ``bridge:{d}:body:<qid>``, a LIST of pieces
  (``<pieces>`` counts the STRING's part as the first), so no command carries
  more than one piece.  The pieces are cut to fill the allocator's size
  classes (jemalloc's, four per doubling: a value just over one takes up to a
  quarter more): full pieces of ``PIECE`` bytes (256 KiB less room for the
  list entry), then at most one more, the largest part of what is left that
  fills a class, when that takes fewer bytes than keeping it in the STRING
  (:func:`_cut`).  A message of a few KB is so the STRING (header, envelope,
  a few hundred bytes) and one piece; one of about 3 KB or less is the STRING
  alone.  The reader takes whatever sizes it finds (the layout before, a
  first piece of 256 KiB in the STRING, reads the same).  A write appends the
  pieces to an expiring ``incoming`` list (the last one can go with the
  storing script) and the storing script renames it into place: an
  interrupted write leaves nothing that lasts;
- a reader gets the STRING and the first piece in one round trip
  (``store_read.lua``), the further pieces one command each;
- the queue is the key's name (a move is a RENAME, as the spool's is); the
  index's sets and entry (index.py) are changed by the same scripts, so
  HoldQueue's index call after each of them changes nothing.

:meth:`RedisStore.write` returns once ``wait_replicas`` replicas have the
write (``WAIT``; :class:`NotReplicated` otherwise, with the copies removed);
a Redis at ``maxmemory`` raises ``OSError(ENOSPC)`` with nothing stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import logging
import re
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from importlib import resources
from typing import IO, Any

from redis.commands.core import AsyncScript
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError

from odmr_bridge import keys
from odmr_bridge.redis_topology import AsyncClient, confirm_replicated
from odmr_bridge.spool import (
    DEFERRED,
    HOLD,
    QUEUES,
    SCRATCH_IN_MEMORY,
    Content,
    CorruptQueueFile,
    Envelope,
    Readable,
    UnknownQueueId,
)
from odmr_bridge.store import Scanned

__all__ = ["PIECE", "NotReplicated", "RedisStore"]

log = logging.getLogger("odmr_bridge.redis_store")

# Content goes to Redis and comes back in pieces of at most this size (one
# command each): 256 KiB less room for a LIST entry's own bytes, so that a full
# piece fills the allocator's 256 KiB size class (a piece of exactly 256 KiB
# took 320 KiB: jemalloc's size classes are four per doubling).
ENTRY = 32  # at most 21 bytes of listpack (or ziplist) framing around one entry
PIECE = 256 * 1024 - ENTRY
# About what a LIST of pieces costs besides its pieces: its keyspace entry, name,
# object and quicklist; and each node of it (one per piece).
LIST_COST = 160
NODE_COST = 32
# Removals of delivered messages sent without waiting, at most this many.
DROPS_IN_FLIGHT = 64
# An unfinished write's pieces expire after this long.
INCOMING_TTL_MS = 3_600_000
# An opened message's content beyond its first piece stays in memory up to
# this size, then goes to an unnamed local file (the sync reader reads that).
READ_IN_MEMORY = 1024 * 1024
# First read of a message's head: enough for the envelope of most messages.
HEAD_GUESS = 8192

_INDEXED = (DEFERRED, HOLD)
_KEY = re.compile(rf"^{keys.PREFIX}:\{{(.+)\}}:q:({'|'.join(QUEUES)}):([^:]+)$")


class NotReplicated(OSError):
    """Fewer replicas than configured confirmed a write in time; what was
    written is removed again (intake answers 451 4.3.0: Postfix retries)."""


def _script(client: AsyncClient, name: str) -> AsyncScript:
    return client.register_script(
        resources.files("odmr_bridge").joinpath("lua", name).read_text())


@contextlib.contextmanager
def _enospc_when_full() -> Iterator[None]:
    """A Redis at maxmemory is a full store: OSError(ENOSPC), as the contract says."""
    try:
        yield
    except RedisError as exc:
        if _is_oom(exc):
            raise OSError(errno.ENOSPC, f"Redis is full: {exc}") from exc
        raise


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and str(exc).startswith("OOM"))


def _recipients_json(envelope: Envelope) -> str:
    """The recipients as the index keeps them (index.py)."""
    return json.dumps([[r.address, r.state] for r in envelope.recipients])


def _allocated(n: int) -> int:
    """The bytes jemalloc (Redis's allocator) hands out for *n*: sizes are
    multiples of 16 up to 128, then four size classes per doubling."""
    if n <= 128:
        return max(16, (n + 15) & ~15)
    spacing = 1 << ((n - 1).bit_length() - 3)
    return -(-n // spacing) * spacing


def _fitting(n: int) -> int:
    """The largest of jemalloc's size classes that is at most *n* (n >= 16)."""
    if n <= 128:
        return n & ~15
    spacing = 1 << (n.bit_length() - 3)
    return n // spacing * spacing


def _string_bytes(n: int) -> int:
    """What a STRING value of *n* bytes takes: its sds header and NUL, rounded."""
    return _allocated(n + (4 if n < 256 else 6 if n < 65536 else 10))


def _cut(size: int, head: int) -> tuple[int, list[int]]:
    """How content of *size* bytes is stored after a message STRING's first
    *head* bytes (its header line and envelope): (bytes of content kept in
    that STRING, the sizes of the LIST pieces that follow, in order).

    Full pieces of ``PIECE`` bytes fill their size class; what is left over
    would be rounded up to the next class (up to a quarter more) if it stayed
    in the STRING, so the largest part of it that fills a class exactly goes
    in one more piece, the last, when that takes fewer bytes all told (about
    ``LIST_COST`` more for a message that has no LIST otherwise).  The STRING
    keeps the header, the envelope and the small rest: rewriting the envelope
    never moves content.  One such piece at most: two small ones could share
    a listpack node and be rounded up together."""
    pieces = [PIECE] * (size // PIECE)
    kept = size - len(pieces) * PIECE
    if kept:
        piece = _fitting(kept + ENTRY) - ENTRY
        whole = _string_bytes(head + kept)
        split = (_string_bytes(head + kept - piece) + piece + ENTRY + NODE_COST
                 + (0 if pieces else LIST_COST))
        if piece > 0 and split < whole:
            pieces.append(piece)
            kept -= piece
    return kept, pieces


async def _content_chunks(content: Content) -> AsyncIterator[bytes]:
    """The content as read: the prefix, then the data in reads of ``PIECE``."""
    for chunk in content.chunks(PIECE):
        yield chunk


async def _recut(chunks: AsyncIterator[bytes], sizes: list[int], qid: str
                 ) -> AsyncIterator[bytes]:
    """*chunks* cut again into parts of *sizes* bytes (ValueError when there
    are more or fewer bytes than they add up to)."""
    held = bytearray()
    async for chunk in chunks:
        held += chunk
        while sizes and len(held) >= sizes[0]:
            part = bytes(held[:sizes[0]])
            del held[:sizes[0]]
            sizes = sizes[1:]
            yield part
        if not sizes and held:
            break
    if held or any(sizes):
        raise ValueError(f"{qid}: content is not the size its envelope says")
    for _ in sizes:  # parts of no bytes
        yield b""


def _head(raw: bytes, name: str) -> tuple[float, int, int]:
    """(stored, pieces, where the first piece starts) from a message's value;
    the envelope is ``raw[end of the header line:that start]``."""
    eol = raw.find(b"\n", 0, 200)
    try:
        stored, count, length = raw[:eol].split(b" ") if eol > 0 else (b"", b"", b"")
        return float(stored), int(count), eol + 1 + int(length)
    except ValueError:
        raise CorruptQueueFile(f"{name}: bad header") from None


def _envelope(raw: bytes, start: int, domain: str, qid: str) -> Envelope:
    try:
        envelope = Envelope.from_json(raw[raw.index(b"\n") + 1:start])
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptQueueFile(f"{qid}: bad envelope: {exc}") from None
    if envelope.qid != qid or envelope.domain != domain:
        raise CorruptQueueFile(f"{qid}: envelope names {envelope.qid} of {envelope.domain}")
    return envelope


class _Body:
    """A stored message's content for the synchronous reader: the first piece
    from memory, the rest from a (spooled) local file filled at open."""

    def __init__(self, first: memoryview, rest: IO[bytes] | None) -> None:
        self.first, self.at, self.rest = first, 0, rest

    def read(self, n: int = -1, /) -> bytes:
        if self.at < len(self.first):
            end = len(self.first) if n < 0 else min(len(self.first), self.at + n)
            data = bytes(self.first[self.at:end])
            self.at = end
            if n < 0 and self.rest is not None:
                data += self.rest.read()
            return data
        return self.rest.read(n) if self.rest is not None else b""


class RedisStore:
    """The :class:`~odmr_bridge.store.Store` in Redis (see the module's text)."""

    keeps_index = True  # every script changes the index with the message

    def __init__(self, client: AsyncClient, wait_replicas: int, wait_timeout_ms: int,
                 scratch_dir: str | None = None) -> None:
        self.redis = client
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.scratch_dir = scratch_dir
        self.incoming_ttl_ms = INCOMING_TTL_MS
        self._append = _script(client, "store_append.lua")
        self._write = _script(client, "store_write.lua")
        self._rewrite = _script(client, "store_rewrite.lua")
        self._move = _script(client, "store_move.lua")
        self._remove = _script(client, "store_remove.lua")
        self._read = _script(client, "store_read.lua")
        # Removals of delivered messages still on their way (see remove()).
        self._dropping: list[asyncio.Task[None]] = []

    async def prepare(self) -> None:
        """Load the scripts up front (as Index.prepare does)."""
        for script in (self._append, self._write, self._rewrite, self._move, self._remove,
                       self._read):
            await self.redis.script_load(script.script)

    def scratch(self) -> IO[bytes]:
        return tempfile.SpooledTemporaryFile(max_size=SCRATCH_IN_MEMORY, dir=self.scratch_dir)

    # -- writing -----------------------------------------------------------------

    async def write(self, copies: Sequence[tuple[Envelope, Content]]) -> None:
        started: list[Envelope] = []
        try:
            for envelope, content in copies:
                started.append(envelope)
                await self._store(envelope, DEFERRED, _content_chunks(content))
            if self.wait_replicas > 0:
                confirmed = await asyncio.gather(*(
                    confirm_replicated(self.redis, keys.stored(e.domain, DEFERRED, e.qid),
                                       self.wait_replicas, self.wait_timeout_ms / 1000)
                    for e in started))
                if not all(confirmed):
                    raise NotReplicated(
                        f"fewer than {self.wait_replicas} replica(s) confirmed the write "
                        f"within {self.wait_timeout_ms} ms")
        except BaseException as exc:
            for envelope in started:  # best effort: unacknowledged, so Postfix retries
                with contextlib.suppress(RedisError, OSError):
                    await self.remove(envelope.domain, envelope.qid)
            if _is_oom(exc):
                raise OSError(errno.ENOSPC, f"Redis is full: {exc}") from exc
            raise

    async def _store(self, envelope: Envelope, queue: str, content: AsyncIterator[bytes]) -> None:
        """Store *content* as :func:`_cut` says and index it (in deferred or hold)
        with one script.  Pieces go first to an expiring incoming list, one
        command each; the last one goes with the storing script instead when it
        and the STRING's part are one piece's worth at most (so a message of up
        to ``PIECE`` bytes takes one command)."""
        d, qid = envelope.domain, envelope.qid
        incoming = keys.incoming(d, qid)
        raw = envelope.to_json()
        stored = repr(time.time())
        kept, sizes = _cut(envelope.size, len(stored) + len(raw) + 12)
        inline = bool(sizes) and kept + sizes[-1] <= PIECE
        first, last, appended = b"", b"", 0
        try:
            n = 0
            async for part in _recut(content, [kept, *sizes], qid):
                if n == 0:
                    first = part
                elif inline and n == len(sizes):
                    last = part
                else:
                    await self._append(keys=[incoming], args=[part, self.incoming_ttl_ms])
                    appended += 1
                n += 1
            value = f"{stored} {1 + len(sizes)} {len(raw)}\n".encode() + raw + first
            indexed = queue in _INDEXED
            if indexed:
                # The one global key, in its own command, first (as Index.add does).
                await self.redis.sadd(keys.DOMAINS, d)
            await self._write(
                keys=[keys.stored(d, queue, qid), incoming, keys.pieces(d, qid),
                      keys.hold(d) if queue == HOLD else keys.deferred(d),
                      keys.message(d, qid), keys.stats(d)],
                args=[value, appended, queue if indexed else "", qid,
                      repr(envelope.arrival), envelope.size, envelope.sender,
                      _recipients_json(envelope), last])
        except BaseException:
            if appended:
                with contextlib.suppress(RedisError, OSError):
                    await self.redis.delete(incoming)
            raise

    async def copy(self, envelope: Envelope, body_of: str, source: str, target: str) -> None:
        if envelope.qid == body_of and source == target:
            await self.rewrite(envelope, target)
            return
        with _enospc_when_full():
            await self._store(envelope, target,
                              self._pieces_of(envelope.domain, body_of, source))

    async def _pieces_of(self, domain: str, qid: str, queue: str) -> AsyncIterator[bytes]:
        raw: Any = await self.redis.get(keys.stored(domain, queue, qid))  # bytes: no decoding
        if raw is None:
            raise UnknownQueueId(qid)
        _, count, start = _head(raw, qid)
        yield raw[start:]
        for i in range(count - 1):
            yield await self._piece(domain, qid, queue, i, count)

    async def _piece(self, domain: str, qid: str, queue: str, i: int, count: int) -> bytes:
        got: Any = await self.redis.lrange(keys.pieces(domain, qid), i, i)
        if got:
            piece: bytes = got[0]
            return piece
        if await self.redis.exists(keys.stored(domain, queue, qid)):
            raise CorruptQueueFile(f"{qid}: piece {i + 2} of {count} is missing")
        raise UnknownQueueId(qid)

    async def rewrite(self, envelope: Envelope, queue: str = DEFERRED) -> None:
        d, qid = envelope.domain, envelope.qid
        with _enospc_when_full():
            done = await self._rewrite(keys=[keys.stored(d, queue, qid), keys.message(d, qid)],
                                       args=[envelope.to_json(), _recipients_json(envelope),
                                             "1" if envelope.warned else ""])
        if not done:
            raise UnknownQueueId(qid)

    async def move(self, domain: str, qid: str, source: str, target: str) -> None:
        queues = {source: keys.hold(domain) if source == HOLD else keys.deferred(domain),
                  target: keys.hold(domain) if target == HOLD else keys.deferred(domain)}
        moved = await self._move(
            keys=[keys.stored(domain, source, qid), keys.stored(domain, target, qid),
                  queues[source], queues[target], keys.message(domain, qid)],
            args=[qid, "hold" if target == HOLD else "",
                  "1" if source in _INDEXED and target in _INDEXED else ""])
        if not moved:
            raise UnknownQueueId(qid)

    async def remove(self, domain: str, qid: str, queue: str = DEFERRED, *,
                     sync: bool = True) -> None:
        if sync:
            await self._drop(domain, qid, queue, "")
            return
        # A delivered message: its removal goes out while the next message
        # does, and sync() waits for it, as the files store's unlink waits
        # for its directory fsync.  Until then the message is still held: a
        # crash meanwhile delivers it again, never loses it.
        self._dropping.append(asyncio.create_task(self._drop_later(domain, qid, queue)))
        if len(self._dropping) >= DROPS_IN_FLIGHT:
            await self._wait_for_drops()

    async def _drop_later(self, domain: str, qid: str, queue: str) -> None:
        try:
            await self._drop(domain, qid, queue, "")
        except (RedisError, OSError) as exc:
            # Refused or lost on its way, the script did not run: the message
            # is stored and indexed as before and goes out again next session.
            log.warning("%s: removal after delivery failed, the message stays held: %s",
                        qid, exc)

    async def _wait_for_drops(self) -> None:
        if self._dropping:
            # wait(), not gather(): a caller cancelled meanwhile (its session
            # ended) must not cancel the removals of other sessions; and each
            # caller waits for all of them, not only those it found first.
            await asyncio.wait(list(self._dropping))
            self._dropping = [task for task in self._dropping if not task.done()]

    async def sync(self) -> None:
        await self._wait_for_drops()

    async def quarantine(self, domain: str, qid: str, queue: str = DEFERRED) -> None:
        await self._drop(domain, qid, queue, "quarantine")

    async def _drop(self, domain: str, qid: str, queue: str, how: str) -> None:
        await self._remove(
            keys=[keys.stored(domain, queue, qid), keys.pieces(domain, qid),
                  keys.deferred(domain), keys.hold(domain), keys.message(domain, qid),
                  keys.stats(domain), keys.corrupt(domain, qid)],
            args=[qid, how, "1" if queue in _INDEXED else ""])

    # -- reading -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open(self, domain: str, qid: str,
                   queue: str = DEFERRED) -> AsyncIterator[tuple[Readable, Envelope]]:
        got: Any = await self._read(keys=[keys.stored(domain, queue, qid),
                                          keys.pieces(domain, qid)])
        if got is None:
            raise UnknownQueueId(qid)
        raw, listed, piece = got
        _, count, start = _head(raw, qid)
        if listed != count - 1:
            raise CorruptQueueFile(f"{qid}: {listed + 1} pieces, its header says {count}")
        envelope = _envelope(raw, start, domain, qid)
        first = memoryview(raw)[start:]
        rest: IO[bytes] | None = None
        try:
            if count == 2:
                rest = io.BytesIO(piece)
            elif count > 2:
                rest = await self._fetch(domain, qid, queue, piece, count)
            size = len(first) + (rest.seek(0, 2) if rest is not None else 0)
            if size != envelope.size:
                raise CorruptQueueFile(f"{qid}: content is {size} bytes, the envelope says "
                                       f"{envelope.size}")
            if rest is not None:
                rest.seek(0)
            yield _Body(first, rest), envelope
        finally:
            if rest is not None:
                rest.close()

    async def _fetch(self, domain: str, qid: str, queue: str, piece: bytes,
                     count: int) -> IO[bytes]:
        """The LIST's pieces (the first one given), the others one command each,
        into a spooled local file: the reader is synchronous, and this way never
        holds more than ``READ_IN_MEMORY`` + one piece of a message in memory."""
        rest = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (the caller closes it)
            max_size=READ_IN_MEMORY, dir=self.scratch_dir)
        try:
            rest.write(piece)
            for i in range(1, count - 1):
                rest.write(await self._piece(domain, qid, queue, i, count))
        except BaseException:
            rest.close()
            raise
        return rest

    async def _read_head(self, domain: str, qid: str, queue: str) -> tuple[float, Envelope]:
        name = keys.stored(domain, queue, qid)
        raw: Any = await self.redis.getrange(name, 0, HEAD_GUESS - 1)
        if not raw:
            raise UnknownQueueId(qid)
        stored, _, start = _head(raw, qid)
        if start > len(raw):
            raw = await self.redis.getrange(name, 0, start - 1)
            if len(raw) < start:
                raise UnknownQueueId(qid)  # replaced meanwhile: gone from here
        return stored, _envelope(raw, start, domain, qid)

    async def read_envelope(self, domain: str, qid: str, queue: str = DEFERRED) -> Envelope:
        return (await self._read_head(domain, qid, queue))[1]

    async def exists(self, domain: str, qid: str, queue: str) -> bool:
        return bool(await self.redis.exists(keys.stored(domain, queue, qid)))

    async def locate(self, qid: str) -> tuple[str, Envelope]:
        # Operator commands only: a SCAN of the whole keyspace (every master).
        async for name in self._names(keys.stored_pattern("*", qid)):
            domain, queue, _ = name
            with contextlib.suppress(UnknownQueueId):
                return queue, await self.read_envelope(domain, qid, queue)
        raise UnknownQueueId(qid)

    async def scan(self, queue: str) -> AsyncIterator[Scanned]:
        seen: set[tuple[str, str]] = set()
        async for domain, _, qid in self._names(keys.stored_pattern(queue)):
            if (domain, qid) in seen:  # SCAN may name a key twice
                continue
            seen.add((domain, qid))
            try:
                stored, envelope = await self._read_head(domain, qid, queue)
            except UnknownQueueId:
                continue
            except CorruptQueueFile as exc:
                yield Scanned(qid, domain, None, 0.0, str(exc))
                continue
            yield Scanned(qid, domain, envelope, stored)

    async def _names(self, pattern: str) -> AsyncIterator[tuple[str, str, str]]:
        """(domain, queue, qid) of each stored message whose key matches *pattern*."""
        name: Any
        async for name in self.redis.scan_iter(match=pattern, count=1000):
            found = _KEY.match(name.decode() if isinstance(name, bytes) else name)
            if found:
                yield found.group(1), found.group(2), found.group(3)

"""Durable queue files: the record of every held message.  No Redis here.

Layout under the spool directory, with Postfix's words:

    incoming/   files being written; never a message (cleared at start-up)
    deferred/   committed messages waiting for their customer's ATRN
    hold/       messages the operator put on hold: not delivered until released
    bounce/     delivery status notifications (bounces, delay warnings) waiting
                to be sent to the original sender through the host MTA
    corrupt/    files that failed validation, kept for the operator

A queue file is ``MAGIC``, one line of JSON (the envelope), the body bytes
exactly as received (CRLF lines, not dot-stuffed), then ``TRAILER``.  A file
without its trailer, or whose length disagrees with the envelope, is not a
message.  Every write goes to ``incoming/``, is fsynced, renamed into place,
and the directory is fsynced, before the caller may acknowledge anything.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

MAGIC = b"ODMRQ 1\n"
TRAILER = b"\nODMRQ END\n"
MAX_HEADER = 4 * 1024 * 1024
COPY_CHUNK = 1024 * 1024

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"

# The queues (directories) a committed file can be in.
DEFERRED = "deferred"
HOLD = "hold"
BOUNCE = "bounce"
QUEUES = (DEFERRED, HOLD, BOUNCE)

_QID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


# DATA up to this size stays in memory on its way to the spool; beyond, it
# goes to an unnamed scratch file in incoming/.
SCRATCH_IN_MEMORY = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Content:
    """A message to write: header lines of our own, then the data as received.

    *data* is bytes, or a file that is read from its start for each copy.
    """

    prefix: bytes
    data: bytes | IO[bytes]

    @property
    def size(self) -> int:
        if isinstance(self.data, bytes):
            return len(self.prefix) + len(self.data)
        return len(self.prefix) + self.data.seek(0, os.SEEK_END)

    def chunks(self, size: int = COPY_CHUNK) -> Iterator[bytes]:
        """The whole content: the prefix, then the data in pieces of at most *size* bytes."""
        yield self.prefix
        if isinstance(self.data, bytes):
            for start in range(0, len(self.data), size):
                yield self.data[start:start + size]
        else:
            self.data.seek(0)
            yield from read_chunks(self.data, size)


def read_chunks(source: Readable, size: int = COPY_CHUNK) -> Iterator[bytes]:
    """*source* to its end, in reads of *size* bytes."""
    while chunk := source.read(size):
        yield chunk


def gathered(pieces: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    """*pieces* in groups of at least *size* bytes (the last may be smaller),
    each to leave in one write."""
    group: list[bytes] = []
    total = 0
    for piece in pieces:
        group.append(piece)
        total += len(piece)
        if total >= size:
            yield group
            group, total = [], 0
    if group:
        yield group


class CorruptQueueFile(Exception):
    """A queue file failed validation; the message says why."""


class UnknownQueueId(Exception):
    """No queue file has this ID."""


@dataclasses.dataclass
class Recipient:
    address: str
    options: list[str] = dataclasses.field(default_factory=list)
    state: str = PENDING
    reason: str = ""


@dataclasses.dataclass
class Envelope:
    qid: str
    domain: str
    sender: str
    arrival: float
    size: int
    recipients: list[Recipient]
    mail_options: list[str] = dataclasses.field(default_factory=list)
    # A delay warning went to the sender (sent once per message).
    warned: bool = False
    # In bounce/: the queue ID of the message this notification is about.
    about: str = ""

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def to_json(self) -> bytes:
        # Built by hand: dataclasses.asdict's deep copy is a hot spot at intake.
        data = {
            "qid": self.qid, "domain": self.domain, "sender": self.sender,
            "arrival": self.arrival, "size": self.size, "mail_options": self.mail_options,
            "recipients": [{"address": r.address, "options": r.options, "state": r.state,
                            "reason": r.reason} for r in self.recipients],
        }
        if self.warned:
            data["warned"] = True
        if self.about:
            data["about"] = self.about
        return json.dumps(data, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data: dict[str, Any] = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("recipients"), list):
            raise ValueError("envelope is not an object with a recipient list")
        data["recipients"] = [Recipient(**r) for r in data["recipients"]]
        return cls(**data)


def new_qid(now: float | None = None) -> str:
    """A short, unique, time-ordered queue ID (Postfix long-ID style)."""
    base = len(_QID_ALPHABET)
    micros = int((time.time() if now is None else now) * 1_000_000)
    digits = []
    while micros:
        micros, digit = divmod(micros, base)
        digits.append(_QID_ALPHABET[digit])
    # Five random digits from one draw (31**5 < 2**32; the bias is negligible).
    draw = secrets.randbits(32)
    for _ in range(5):
        draw, digit = divmod(draw, base)
        digits.insert(0, _QID_ALPHABET[digit])
    return "".join(reversed(digits))


def valid_qid(qid: str) -> bool:
    return 8 <= len(qid) <= 32 and all(c in _QID_ALPHABET for c in qid)


def _writev_all(fd: int, buffers: list[bytes]) -> None:
    written = os.writev(fd, buffers)
    if written < sum(map(len, buffers)):  # a short write (a signal, a full disk): finish it
        rest = memoryview(b"".join(buffers))[written:]
        while rest:
            rest = rest[os.write(fd, rest):]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.deferred = self.root / DEFERRED
        self.corrupt = self.root / "corrupt"

    def ensure(self) -> None:
        for d in (self.incoming, self.corrupt, *(self.directory(q) for q in QUEUES)):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def clear_incoming(self) -> int:
        """Remove half-written files left by a crash; they were never acknowledged."""
        removed = 0
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def directory(self, queue: str) -> Path:
        if queue not in QUEUES:
            raise ValueError(f"unknown queue {queue!r}")
        return self.root / queue

    # -- writing -----------------------------------------------------------

    def scratch(self) -> IO[bytes]:
        """Where DATA goes as it arrives: memory, then an unnamed file in incoming/."""
        return tempfile.SpooledTemporaryFile(max_size=SCRATCH_IN_MEMORY, dir=str(self.incoming))

    def _write_temp(self, envelope: Envelope, body: bytes | Readable | Content) -> Path:
        """Write and fsync a whole queue file in incoming/; on any error, remove it.

        Written with plain system calls, gathered: a 5 KB message is one
        open, one writev, one fsync and one close (each a release and a
        re-take of the interpreter lock, which the event loop also wants).
        """
        temp = self.incoming / envelope.qid
        if isinstance(body, bytes):
            content: Iterator[bytes] = iter((body,))
        elif isinstance(body, Content):
            content = body.chunks()
        else:
            content = read_chunks(body)
        # O_TRUNC: a leftover of a command that died mid-write is overwritten.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            for group in gathered(itertools.chain((MAGIC, envelope.to_json(), b"\n"),
                                                  content, (TRAILER,)), COPY_CHUNK):
                _writev_all(fd, group)
            os.fsync(fd)
        except BaseException:
            temp.unlink(missing_ok=True)  # a disk-full write must not linger
            raise
        finally:
            os.close(fd)
        return temp

    def commit(self, envelopes: list[tuple[Envelope, bytes | Content]]) -> None:
        """Make each (envelope, body) a deferred message, durably, all or none.

        On failure every file written so far is removed and the error raised.
        """
        written: list[Path] = []
        placed: list[Path] = []
        try:
            for envelope, body in envelopes:
                written.append(self._write_temp(envelope, body))
            for temp in written:
                final = self.deferred / temp.name
                os.rename(temp, final)
                placed.append(final)
            _fsync_dir(self.deferred)
        except BaseException:
            for path in written + placed:
                path.unlink(missing_ok=True)
            raise

    def place(self, envelope: Envelope, body_of: str, source: str, target: str) -> None:
        """Write *envelope* with the body of message *body_of* (in *source*) into *target*.

        The new file is named after ``envelope.qid``; with the same ID and
        queue this replaces the envelope of a message (its recipient states).
        """
        with self.open_body(body_of, source) as (body, old):
            temp = self._write_temp(envelope, _Limited(body, old.size))
        try:
            os.rename(temp, self.directory(target) / envelope.qid)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory(target))

    def rewrite(self, envelope: Envelope, queue: str = DEFERRED) -> None:
        """Replace a message's envelope (recipient states), keeping its body."""
        self.place(envelope, envelope.qid, queue, queue)

    def move(self, qid: str, source: str, target: str) -> None:
        """Rename a message from one queue to another (hold, release), durably."""
        try:
            os.rename(self.path(qid, source), self.path(qid, target))
        except FileNotFoundError:
            raise UnknownQueueId(qid) from None
        _fsync_dir(self.directory(target))
        _fsync_dir(self.directory(source))

    def remove(self, qid: str, queue: str = DEFERRED, *, sync: bool = True) -> None:
        """Drop a message whose recipients are all final (or that was deleted).

        With ``sync=False`` the directory fsync is left to :meth:`sync`, which
        the caller batches.  A power loss before that can only bring a
        delivered message back (a duplicate), never lose one.
        """
        self.path(qid, queue).unlink(missing_ok=True)
        if sync:
            _fsync_dir(self.directory(queue))

    def sync(self, queue: str = DEFERRED) -> None:
        _fsync_dir(self.directory(queue))

    def quarantine(self, qid: str, queue: str = DEFERRED) -> None:
        os.rename(self.path(qid, queue), self.corrupt / qid)
        _fsync_dir(self.corrupt)
        _fsync_dir(self.directory(queue))

    # -- reading -----------------------------------------------------------

    def path(self, qid: str, queue: str = DEFERRED) -> Path:
        if not valid_qid(qid):
            raise UnknownQueueId(qid)
        return self.directory(queue) / qid

    def ids(self, queue: str = DEFERRED) -> Iterator[str]:
        for entry in os.scandir(self.directory(queue)):
            if entry.is_file() and valid_qid(entry.name):
                yield entry.name

    def find(self, qid: str) -> str:
        """The queue holding file *qid*: deferred, hold or bounce."""
        for queue in QUEUES:
            if self.path(qid, queue).exists():
                return queue
        raise UnknownQueueId(qid)

    def read_envelope(self, qid: str, queue: str = DEFERRED) -> Envelope:
        with self.open_body(qid, queue) as (_, envelope):
            return envelope

    def open_body(self, qid: str, queue: str = DEFERRED) -> _BodyReader:
        return _BodyReader(self.path(qid, queue))


class _Limited:
    """A file object that reads at most *limit* bytes from *inner*."""

    def __init__(self, inner: Readable, limit: int) -> None:
        self.inner = inner
        self.left = limit

    def read(self, n: int = -1, /) -> bytes:
        if self.left <= 0:
            return b""
        want = self.left if n < 0 else min(n, self.left)
        data = self.inner.read(want)
        self.left -= len(data)
        return data


def parse_header(handle: IO[bytes], file_size: int, name: str) -> Envelope:
    """Validate a queue file and leave *handle* positioned at the body."""
    if handle.read(len(MAGIC)) != MAGIC:
        raise CorruptQueueFile(f"{name}: bad magic")
    line = handle.readline(MAX_HEADER)
    if not line.endswith(b"\n"):
        raise CorruptQueueFile(f"{name}: unterminated envelope")
    try:
        envelope = Envelope.from_json(line[:-1])
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptQueueFile(f"{name}: bad envelope: {exc}") from None
    body_start = handle.tell()
    if file_size != body_start + envelope.size + len(TRAILER):
        raise CorruptQueueFile(f"{name}: length does not match envelope (truncated?)")
    handle.seek(body_start + envelope.size)
    if handle.read(len(TRAILER)) != TRAILER:
        raise CorruptQueueFile(f"{name}: missing end marker")
    handle.seek(body_start)
    return envelope


class _BodyReader:
    """``with spool.open_body(qid) as (body, envelope)``: a validated queue file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: IO[bytes] | None = None

    def __enter__(self) -> tuple[Readable, Envelope]:
        try:
            self.handle = open(self.path, "rb")
        except FileNotFoundError:
            raise UnknownQueueId(self.path.name) from None
        try:
            size = os.fstat(self.handle.fileno()).st_size
            envelope = parse_header(self.handle, size, self.path.name)
        except BaseException:
            self.handle.close()
            raise
        return _Limited(self.handle, envelope.size), envelope

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()

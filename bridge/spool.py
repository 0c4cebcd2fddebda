"""Durable queue files: the record of every held message.  No Redis here.

Layout under the spool directory, with Postfix's words:

    incoming/   files being written; never a message (cleared at start-up)
    deferred/   committed messages waiting for their customer's ATRN
    failed/     messages whose recipients all reached a final state and at
                least one failed permanently (input for bounces)
    corrupt/    files that failed validation, kept for the operator

A queue file is ``MAGIC``, one line of JSON (the envelope), the body bytes
exactly as received (CRLF lines, not dot-stuffed), then ``TRAILER``.  A file
without its trailer, or whose length disagrees with the envelope, is not a
message.  Every write goes to ``incoming/``, is fsynced, renamed into place,
and the directory is fsynced, before the caller may acknowledge anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

MAGIC = b"ODMRQ 1\n"
TRAILER = b"\nODMRQ END\n"
MAX_HEADER = 4 * 1024 * 1024
COPY_CHUNK = 1024 * 1024

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"

_QID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


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
        return json.dumps(data, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data: dict[str, Any] = json.loads(raw)
        data["recipients"] = [Recipient(**r) for r in data["recipients"]]
        return cls(**data)


def new_qid(now: float | None = None) -> str:
    """A short, unique, time-ordered queue ID (Postfix long-ID style)."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    digits = []
    base = len(_QID_ALPHABET)
    while micros:
        micros, digit = divmod(micros, base)
        digits.append(_QID_ALPHABET[digit])
    random_part = "".join(secrets.choice(_QID_ALPHABET) for _ in range(5))
    return "".join(reversed(digits)) + random_part


def valid_qid(qid: str) -> bool:
    return 8 <= len(qid) <= 32 and all(c in _QID_ALPHABET for c in qid)


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
        self.deferred = self.root / "deferred"
        self.failed = self.root / "failed"
        self.corrupt = self.root / "corrupt"

    def ensure(self) -> None:
        for d in (self.incoming, self.deferred, self.failed, self.corrupt):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def clear_incoming(self) -> int:
        """Remove half-written files left by a crash; they were never acknowledged."""
        removed = 0
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    # -- writing -----------------------------------------------------------

    def _write_temp(self, envelope: Envelope, body: bytes | Readable) -> Path:
        temp = self.incoming / envelope.qid
        with open(temp, "wb") as out:
            out.write(MAGIC)
            out.write(envelope.to_json())
            out.write(b"\n")
            if isinstance(body, bytes):
                out.write(body)
            else:
                shutil.copyfileobj(body, out, COPY_CHUNK)
            out.write(TRAILER)
            out.flush()
            os.fsync(out.fileno())
        return temp

    def commit(self, envelopes: list[tuple[Envelope, bytes]]) -> None:
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

    def rewrite(self, envelope: Envelope) -> None:
        """Replace a deferred message's envelope (recipient states), keeping its body."""
        with self.open_body(envelope.qid) as (body, _):
            temp = self._write_temp(envelope, _Limited(body, envelope.size))
        os.rename(temp, self.deferred / envelope.qid)
        _fsync_dir(self.deferred)

    def retire(self, envelope: Envelope, *, sync: bool = True) -> None:
        """All recipients are final: drop the file, or keep it in failed/ for bounces.

        With ``sync=False`` a plain removal (everything delivered) skips the
        directory fsync; the caller batches it with :meth:`sync_deferred`.  A
        power loss before that can only bring a delivered message back (a
        duplicate), never lose one.  Moves to failed/ are always synced.
        """
        source = self.deferred / envelope.qid
        if any(r.state == FAILED for r in envelope.recipients):
            with self.open_body(envelope.qid) as (body, _):
                temp = self._write_temp(envelope, _Limited(body, envelope.size))
            os.rename(temp, self.failed / envelope.qid)
            _fsync_dir(self.failed)
            sync = True
        source.unlink(missing_ok=True)
        if sync:
            _fsync_dir(self.deferred)

    def sync_deferred(self) -> None:
        _fsync_dir(self.deferred)

    def quarantine(self, qid: str) -> None:
        os.rename(self.deferred / qid, self.corrupt / qid)
        _fsync_dir(self.corrupt)
        _fsync_dir(self.deferred)

    # -- reading -----------------------------------------------------------

    def path(self, qid: str) -> Path:
        if not valid_qid(qid):
            raise UnknownQueueId(qid)
        return self.deferred / qid

    def deferred_ids(self) -> Iterator[str]:
        for entry in os.scandir(self.deferred):
            if entry.is_file() and valid_qid(entry.name):
                yield entry.name

    def read_envelope(self, qid: str) -> Envelope:
        with self.open_body(qid) as (_, envelope):
            return envelope

    def open_body(self, qid: str) -> _BodyReader:
        return _BodyReader(self.path(qid))


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

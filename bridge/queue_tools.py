"""Operator views and commands for the hold queue, in the habits of Postfix's tools.

``show`` is ``postcat``, ``summary`` is ``qshape``; ``delete``, ``hold``,
``release`` and ``requeue`` are ``postsuper -d/-h/-H/-r``.  They ask the
hold queue (queue.py), which alone changes stored messages; every change
runs under the domain's lease, so it never races an ATRN session delivering
the same message.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator

from odmr_bridge.index import IndexedMessage
from odmr_bridge.queue import DomainBusy, HoldQueue
from odmr_bridge.spool import (
    BOUNCE,
    DEFERRED,
    HOLD,
    CorruptQueueFile,
    Envelope,
    UnknownQueueId,
    valid_qid,
)

log = logging.getLogger("odmr_bridge.queue_tools")

# qshape's default buckets, in minutes.
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


class QueueToolError(Exception):
    """Unknown queue ID, busy domain and the like; the message says which."""


def _stamp(when: float) -> str:
    return datetime.datetime.fromtimestamp(when).strftime("%a %b %d %H:%M:%S %Y")


@contextlib.contextmanager
def _looked_up(qid: str) -> Iterator[None]:
    """Turn a bad, unknown or corrupt queue ID into a QueueToolError naming the problem."""
    if not valid_qid(qid):
        raise QueueToolError(f"{qid}: not a queue ID")
    try:
        yield
    except UnknownQueueId:
        raise QueueToolError(f"{qid}: no such message in the hold queue") from None
    except CorruptQueueFile as exc:
        raise QueueToolError(f"corrupt queue file: {exc}") from None


async def _locate(queue: HoldQueue, qid: str) -> tuple[str, Envelope]:
    """(queue, envelope) of a held message or notice."""
    with _looked_up(qid):
        return await queue.locate(qid)


async def show(queue: HoldQueue, qid: str) -> bytes:
    """``postcat``: the envelope, each recipient's state, then the message."""
    with _looked_up(qid):
        where, envelope, content = await queue.show(qid)
    lines = [
        f"*** ENVELOPE RECORDS {qid} ***",
        f"queue: {where}",
        f"domain: {envelope.domain}",
        f"message_size: {envelope.size}",
        f"message_arrival_time: {_stamp(envelope.arrival)}",
        f"sender: {envelope.sender}",
        *([f"notice_about: {envelope.about}"] if envelope.about else []),
        f"mail_options: {' '.join(envelope.mail_options)}",
    ]
    for rcpt in envelope.recipients:
        extra = f" ({rcpt.reason})" if rcpt.reason else ""
        options = f" {' '.join(rcpt.options)}" if rcpt.options else ""
        lines.append(f"recipient: {rcpt.address}{options} [{rcpt.state}]{extra}")
    lines.append(f"*** MESSAGE CONTENTS {qid} ***")
    return "\n".join(lines).encode() + b"\n" + content + b"*** END OF MESSAGE ***\n"


async def _each(queue: HoldQueue, qids: Iterable[str], wanted: tuple[str, ...],
                action: str) -> list[tuple[str, Envelope]]:
    """Locate every message first, so a typo in the list changes nothing."""
    found = [(qid, *await _locate(queue, qid)) for qid in qids]
    for qid, where, _ in found:
        if where not in wanted:
            what = {HOLD: "on hold", DEFERRED: "deferred", BOUNCE: "a notice to a sender"}
            raise QueueToolError(f"{qid}: cannot {action}: the message is {what[where]}")
    return [(where, envelope) for _, where, envelope in found]


Step = Callable[[HoldQueue, str, Envelope], Awaitable[str]]


async def _exclusive_each(queue: HoldQueue, messages: list[tuple[str, Envelope]],
                          step: Step) -> list[str]:
    """Run *step* on each message under its domain's lease; the steps' results."""
    results = []
    for where, envelope in messages:
        try:
            async with queue.exclusive(envelope.domain):
                results.append(await step(queue, where, envelope))
        except DomainBusy as exc:
            raise QueueToolError(f"{envelope.qid}: {exc}; try again when it ends") from None
        except UnknownQueueId:
            raise QueueToolError(f"{envelope.qid}: gone from the hold queue meanwhile "
                                 "(delivered or expired)") from None
    return results


async def _delete(queue: HoldQueue, where: str, envelope: Envelope) -> str:
    await queue.delete(where, envelope)
    return envelope.qid


async def _hold(queue: HoldQueue, where: str, envelope: Envelope) -> str:
    await queue.hold(envelope)
    return envelope.qid


async def _release(queue: HoldQueue, where: str, envelope: Envelope) -> str:
    await queue.release(envelope)
    return envelope.qid


async def _requeue(queue: HoldQueue, where: str, envelope: Envelope) -> str:
    return await queue.requeue(where, envelope)


async def delete(queue: HoldQueue, qids: Iterable[str]) -> list[str]:
    """``postsuper -d``: remove held messages (deliverable or on hold) or notices."""
    messages = await _each(queue, qids, (DEFERRED, HOLD, BOUNCE), "delete")
    return await _exclusive_each(queue, messages, _delete)


async def hold(queue: HoldQueue, qids: Iterable[str]) -> list[str]:
    """``postsuper -h``: keep messages from ATRN delivery (and from expiry) until released."""
    messages = await _each(queue, qids, (DEFERRED,), "put on hold")
    return await _exclusive_each(queue, messages, _hold)


async def release(queue: HoldQueue, qids: Iterable[str]) -> list[str]:
    """``postsuper -H``: make messages on hold deliverable again."""
    messages = await _each(queue, qids, (HOLD,), "release")
    return await _exclusive_each(queue, messages, _release)


async def requeue(queue: HoldQueue, qids: Iterable[str]) -> dict[str, str]:
    """``postsuper -r``: a new queue ID and arrival time (the expiry and delay
    warning clocks restart), pending recipients only, last replies cleared;
    a message on hold is released by it.  Returns old ID -> new ID."""
    messages = await _each(queue, qids, (DEFERRED, HOLD), "requeue")
    fresh = await _exclusive_each(queue, messages, _requeue)
    return {e.qid: new for (_, e), new in zip(messages, fresh, strict=True)}


def summary(messages: Iterable[IndexedMessage], now: float | None = None) -> str:
    """``qshape``: held messages per domain and age bucket (minutes)."""
    current = time.time() if now is None else now
    table: dict[str, list[int]] = {}
    for m in messages:
        row = table.setdefault(m.domain, [0] * (len(AGE_BUCKETS) + 1))
        age = (current - m.arrival) / 60
        bucket = next((i for i, limit in enumerate(AGE_BUCKETS) if age < limit),
                      len(AGE_BUCKETS))
        row[bucket] += 1
    header = ["", "T", *(str(b) for b in AGE_BUCKETS), f"{AGE_BUCKETS[-1]}+"]
    totals = [sum(col) for col in zip(*table.values(), strict=True)] if table else \
        [0] * (len(AGE_BUCKETS) + 1)
    rows = [["TOTAL", str(sum(totals)), *map(str, totals)]]
    for domain, counts in sorted(table.items(), key=lambda kv: -sum(kv[1])):
        rows.append([domain, str(sum(counts)), *map(str, counts)])
    width = max(len(r[0]) for r in [header, *rows])
    return "\n".join(
        f"{r[0]:>{width}} " + " ".join(f"{c:>5}" for c in r[1:]) for r in [header, *rows])

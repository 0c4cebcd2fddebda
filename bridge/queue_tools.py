"""Operator views of the hold queue, in the habits of Postfix's tools.

``show`` is ``postcat``, ``summary`` is ``qshape``, ``delete`` is
``postsuper -d``.  They read the spool (the record) and the Redis index.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable

from bridge.index import IndexedMessage
from bridge.queue import HoldQueue
from bridge.spool import UnknownQueueId, valid_qid

# qshape's default buckets, in minutes.
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


class QueueToolError(Exception):
    """Unknown queue ID, busy domain and the like; the message says which."""


def _stamp(when: float) -> str:
    return datetime.datetime.fromtimestamp(when).strftime("%a %b %d %H:%M:%S %Y")


def show(queue: HoldQueue, qid: str) -> bytes:
    """``postcat``: the envelope, each recipient's state, then the message."""
    if not valid_qid(qid):
        raise QueueToolError(f"{qid}: not a queue ID")
    try:
        with queue.spool.open_body(qid) as (body, envelope):
            content = body.read()
    except UnknownQueueId:
        raise QueueToolError(f"{qid}: no such message in the hold queue") from None
    lines = [
        f"*** ENVELOPE RECORDS {qid} ***",
        f"domain: {envelope.domain}",
        f"message_size: {envelope.size}",
        f"message_arrival_time: {_stamp(envelope.arrival)}",
        f"sender: {envelope.sender}",
        f"mail_options: {' '.join(envelope.mail_options)}",
    ]
    for rcpt in envelope.recipients:
        extra = f" ({rcpt.reason})" if rcpt.reason else ""
        options = f" {' '.join(rcpt.options)}" if rcpt.options else ""
        lines.append(f"recipient: {rcpt.address}{options} [{rcpt.state}]{extra}")
    lines.append(f"*** MESSAGE CONTENTS {qid} ***")
    return "\n".join(lines).encode() + b"\n" + content + b"*** END OF MESSAGE ***\n"


async def delete(queue: HoldQueue, qids: Iterable[str]) -> list[str]:
    """``postsuper -d``: remove held messages; refuses while their domain is collected."""
    deleted = []
    for qid in qids:
        if not valid_qid(qid):
            raise QueueToolError(f"{qid}: not a queue ID")
        try:
            envelope = queue.spool.read_envelope(qid)
        except UnknownQueueId:
            raise QueueToolError(f"{qid}: no such message in the hold queue") from None
        if await queue.index.leased(envelope.domain):
            raise QueueToolError(f"{qid}: {envelope.domain} is being collected by an ATRN "
                                 "session right now; try again when it ends")
        queue.spool.path(qid).unlink(missing_ok=True)
        queue.spool.sync_deferred()
        await queue.index.remove(envelope.domain, qid)
        deleted.append(qid)
    return deleted


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

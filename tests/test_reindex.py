"""`odmr-bridge reindex` is safe while the daemon serves.

It only adds what it finds on the spool and only drops index entries whose
file is gone, domain by domain under the domain's lease: mail arriving while
it runs is never hidden from ATRN, and every accepted message is collected
exactly once.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

from odmr_bridge import keys
from odmr_bridge.queue import HoldQueue
from odmr_bridge.spool import Envelope, Recipient, Spool, new_qid
from tests.conftest import CUSTOMER
from tests.peers import Bridge
from tests.wire import CustomerMta, Wire, lmtp_send

MESSAGES = 300
_NUMBER = re.compile(rb"^X-Number: (\d+)\r?$", re.MULTILINE)


def numbered(n: int) -> bytes:
    return (f"Subject: reindex {n}\r\nX-Number: {n}\r\n\r\n".encode()
            + b"body line\r\n" * 20)


def test_reindex_during_intake_hides_nothing(bridge: Bridge) -> None:
    accepted: list[int] = []
    errors: list[BaseException] = []

    def intake() -> None:
        try:
            for n in range(MESSAGES):
                [(code, _)] = lmtp_send(bridge.lmtp_port, "s@x.test", [f"r{n}@atrn.example"],
                                        numbered(n))
                if code == 250:
                    accepted.append(n)
                time.sleep(0.01)  # spread intake over several reindex runs
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    runs: list[str] = []

    def reindex() -> None:
        # Two operators at once, over and over, for as long as mail comes in.
        try:
            while sender.is_alive() or len(runs) < 4:
                runs.append(bridge.cli("reindex").stdout)
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=intake)
    sender.start()
    operators = [threading.Thread(target=reindex) for _ in range(2)]
    for operator in operators:
        operator.start()
    sender.join()
    for operator in operators:
        operator.join()
    assert errors == []
    assert all("reindexed" in out for out in runs)
    assert len(accepted) == MESSAGES

    w = Wire(bridge.odmr_port, timeout=30)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    mta = CustomerMta(w)
    mta.run()
    w.close()

    delivered = [int(_NUMBER.search(data).group(1))  # type: ignore[union-attr]
                 for _, _, data in mta.messages]
    missing = sorted(set(accepted) - set(delivered))
    twice = sorted(n for n in set(delivered) if delivered.count(n) > 1)
    assert missing == [], f"not delivered: {missing} ({len(runs)} reindex runs)"
    assert twice == []
    assert sorted(delivered) == sorted(accepted)
    left = [p.name for q in ("deferred", "hold") for p in (bridge.spool / q).iterdir()]
    assert left == [], f"left on the spool: {left}"
    assert bridge.held() == []


async def test_reindex_leaves_entries_as_they_are_and_recounts_stats(
        queue: HoldQueue, spool: Spool) -> None:
    envelope = Envelope(qid=new_qid(), domain="atrn.example", sender="s@x.test",
                        arrival=time.time(), size=len(numbered(1)),
                        recipients=[Recipient("a@atrn.example")])
    await asyncio.to_thread(spool.commit, [(envelope, numbered(1))])
    report = await queue.reindex()  # a file without an entry: indexed
    assert (report.messages, report.added, report.removed) == (1, 1, 0)
    redis = queue.index.redis
    await redis.hset(keys.message("atrn.example", envelope.qid), "mark", "kept")
    await redis.hset(keys.stats("atrn.example"), mapping={"messages": 7, "bytes": 1})
    gone = Envelope(qid=new_qid(), domain="atrn.example", sender="s@x.test",
                    arrival=time.time(), size=5, recipients=[Recipient("b@atrn.example")])
    await queue.index.add(gone)  # its file is gone: a stale entry
    report = await queue.reindex()
    assert (report.added, report.removed) == (0, 1)
    assert await redis.hget(keys.message("atrn.example", envelope.qid), "mark") == b"kept"
    assert await queue.index.stats("atrn.example") == {"messages": 1,
                                                       "bytes": len(numbered(1))}
    assert await queue.held("atrn.example") == [envelope.qid]


async def test_reindex_waits_for_the_lease_or_names_the_busy_domain(
        queue: HoldQueue, spool: Spool) -> None:
    envelope = Envelope(qid=new_qid(), domain="atrn.example", sender="s@x.test",
                        arrival=time.time(), size=10, recipients=[Recipient("a@atrn.example")])
    await asyncio.to_thread(spool.commit, [(envelope, b"x" * 10)])
    async with queue.exclusive("atrn.example"):  # an ATRN session, say
        report = await queue.reindex(wait=0.2)
    assert report.busy == ["atrn.example"]
    assert await queue.held("atrn.example") == []  # untouched, for a later run
    assert (await queue.reindex()).added == 1

"""HoldQueue is the one owner of queue state: nothing else writes the store,
the spool or the index's message entries (a source check, so the rule stays
true), and its operator and queue-pass methods, against a real Redis."""

from __future__ import annotations

import ast
import time
from pathlib import Path

from odmr_bridge.index import Index
from odmr_bridge.queue import HoldQueue
from odmr_bridge.spool import BOUNCE, DEFERRED, FAILED, HOLD, PENDING, Recipient, Spool

BRIDGE = Path(__file__).resolve().parent.parent / "bridge"
# Modules allowed to change stored messages: the queue and what is under it.
OWNERS = {"queue.py", "store.py", "spool.py", "index.py"}
# Methods that change a stored message (Spool, Store, Index).
WRITES = {"commit", "place", "rewrite", "move", "remove", "remove_many", "quarantine", "write",
          "copy", "add", "update_recipients", "mark_warned", "recount", "sync"}
# Attributes of HoldQueue that are its own business.
INTERNALS = {"spool", "store", "index"}


def _violations(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        # queue.store / queue.index / queue.spool / self.queue.index ...
        if isinstance(node, ast.Attribute) and node.attr in INTERNALS:
            owner = node.value
            name = owner.attr if isinstance(owner, ast.Attribute) else \
                owner.id if isinstance(owner, ast.Name) else ""
            if name == "queue":
                found.append(f"{path.name}:{node.lineno}: reaches into queue.{node.attr}")
        # spool.move(...), self.spool.remove(...), index.add(...), store.write(...)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in WRITES:
            target = node.func.value
            name = target.attr if isinstance(target, ast.Attribute) else \
                target.id if isinstance(target, ast.Name) else ""
            if name in ("spool", "store", "index", "_spool", "_store", "_index"):
                found.append(f"{path.name}:{node.lineno}: {name}.{node.func.attr}() outside "
                             "queue.py")
    return found


def test_only_the_queue_changes_stored_messages() -> None:
    modules = sorted(p for p in BRIDGE.glob("*.py") if p.name not in OWNERS)
    assert len(modules) > 20
    problems = [v for path in modules for v in _violations(path)]
    assert problems == []


def test_the_check_catches_a_reach_in(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("async def f(queue, spool):\n"
                      "    spool.move('Q', 'deferred', 'hold')\n"
                      "    await queue.index.remove('d', 'Q')\n")
    assert len(_violations(sample)) == 3  # the call, and queue.index twice over


BODY = b"Subject: t\r\n\r\nbody\r\n"


async def _held(queue: HoldQueue, *addresses: str, sender: str = "s@x.test") -> str:
    rcpts = [Recipient(a, ["NOTIFY=FAILURE,DELAY"]) for a in addresses]
    held = await queue.commit(sender, [], {"atrn.example": rcpts}, BODY)
    return held["atrn.example"].qid


async def test_hold_and_release_move_the_message_and_its_entry(queue: HoldQueue,
                                                               spool: Spool) -> None:
    qid = await _held(queue, "a@atrn.example")
    where, envelope = await queue.locate(qid)
    assert where == DEFERRED
    async with queue.exclusive("atrn.example"):
        await queue.hold(envelope)
    assert spool.find(qid) == HOLD
    assert await queue.held("atrn.example") == [] and await queue.on_hold("atrn.example") == [qid]
    async with queue.exclusive("atrn.example"):
        await queue.release(envelope)
    assert spool.find(qid) == DEFERRED
    assert await queue.held("atrn.example") == [qid] and await queue.on_hold("atrn.example") == []
    [listed] = await queue.messages()
    assert (listed.qid, listed.queue) == (qid, "deferred")


async def test_delete_removes_message_entry_and_stats(queue: HoldQueue, spool: Spool) -> None:
    qid = await _held(queue, "a@atrn.example")
    where, envelope = await queue.locate(qid)
    await queue.delete(where, envelope)
    assert list(spool.ids()) == [] and await queue.messages("atrn.example") == []
    assert await queue.stats("atrn.example") == {"messages": 0, "bytes": 0}


async def test_requeue_makes_a_fresh_copy_of_the_pending_recipients(queue: HoldQueue,
                                                                    spool: Spool) -> None:
    qid = await _held(queue, "a@atrn.example", "b@atrn.example")
    envelope = await queue.load("atrn.example", qid)
    assert envelope is not None
    envelope.recipients[1].reason = "451 later"
    await queue.settle(envelope, {})  # nothing final: no change
    async with queue.exclusive("atrn.example"):
        await queue.hold(envelope)
        fresh = await queue.requeue(HOLD, envelope)
    assert fresh != qid and list(spool.ids(HOLD)) == [] and list(spool.ids()) == [fresh]
    assert await queue.held("atrn.example") == [fresh]
    where, copy, content = await queue.show(fresh)
    assert where == DEFERRED and content == BODY and copy.arrival >= envelope.arrival
    assert [r.reason for r in copy.recipients] == ["", ""]


async def test_warn_queues_one_notice_and_marks_the_message(queue: HoldQueue, index: Index,
                                                            spool: Spool) -> None:
    qid = await _held(queue, "a@atrn.example")
    assert await queue.unwarned("atrn.example", [qid]) == [qid]
    envelope = await queue.load("atrn.example", qid)
    assert envelope is not None
    assert await queue.warn(envelope) is True
    assert await queue.warn(envelope) is False  # once per message
    assert await queue.unwarned("atrn.example", [qid]) == []
    assert spool.read_envelope(qid).warned
    [notice] = await queue.waiting_notices()
    assert notice.about == qid and notice.recipients[0].state == PENDING
    [listed] = await queue.notices()
    assert (listed.qid, listed.queue, listed.recipients) == (notice.qid, BOUNCE,
                                                              [("s@x.test", PENDING)])
    async with queue.open_notice(notice) as opened:
        assert opened is not None and opened[0].read() == BODY
    await queue.remove_notice(notice)
    assert await queue.waiting_notices() == [] and list(spool.ids(BOUNCE)) == []


async def test_expire_fails_the_pending_recipients_and_returns_the_message(
        queue: HoldQueue, spool: Spool) -> None:
    qid = await _held(queue, "a@atrn.example")
    assert await queue.due_domains(time.time() + 1) == ["atrn.example"]
    assert await queue.arrived_before("atrn.example", time.time() + 1) == [qid]
    envelope = await queue.load("atrn.example", qid)
    assert envelope is not None
    envelope.recipients[0].reason = "451 try later"
    await queue.expire(envelope, "4.4.7 message expired")
    await queue.sync()
    assert list(spool.ids()) == [] and await queue.held("atrn.example") == []
    [notice] = await queue.waiting_notices()
    assert notice.recipients[0].state == FAILED
    assert notice.recipients[0].reason == "4.4.7 message expired; last reply: 451 try later"
    assert await queue.due_domains(time.time() + 1) == []

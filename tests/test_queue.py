"""The hold queue: spool and Redis index together, against a real redis-server."""

from __future__ import annotations

from odmr_bridge import keys
from odmr_bridge.index import Index
from odmr_bridge.queue import HoldQueue, Outcome
from odmr_bridge.spool import BOUNCE, DELIVERED, FAILED, PENDING, Recipient, Spool

BODY = b"Subject: t\r\n\r\nbody\r\n"


async def hold(queue: HoldQueue, **by_domain: list[str]) -> dict[str, str]:
    rcpts = {d.replace("_", "."): [Recipient(a) for a in addrs] for d, addrs in by_domain.items()}
    held = await queue.commit("s@x.test", [], rcpts, BODY)
    return {domain: envelope.qid for domain, envelope in held.items()}


async def test_commit_holds_once_per_domain_and_indexes_each(
        queue: HoldQueue, spool: Spool) -> None:
    qids = await hold(queue, atrn_example=["a@atrn.example", "b@atrn.example"],
                      second_example=["c@second.example"])
    assert set(qids) == {"atrn.example", "second.example"}
    assert qids["atrn.example"] != qids["second.example"]
    assert await queue.held("atrn.example") == [qids["atrn.example"]]
    [msg] = await queue.index.messages("atrn.example")
    assert msg.recipients == [("a@atrn.example", PENDING), ("b@atrn.example", PENDING)]
    assert await queue.index.stats("atrn.example") == {"messages": 1, "bytes": len(BODY)}
    assert sorted(spool.ids()) == sorted(qids.values())


async def test_partial_delivery_keeps_the_rest_held(queue: HoldQueue, spool: Spool) -> None:
    qid = (await hold(queue, atrn_example=["a@atrn.example", "b@atrn.example",
                                           "c@atrn.example"]))["atrn.example"]
    env = await queue.load("atrn.example", qid)
    assert env is not None
    await queue.settle(env, {"a@atrn.example": Outcome(DELIVERED, "250 ok"),
                             "b@atrn.example": Outcome(PENDING, "451 later"),
                             "c@atrn.example": Outcome(FAILED, "550 no")})
    again = await queue.load("atrn.example", qid)
    assert again is not None
    assert [r.address for r in again.pending()] == ["b@atrn.example"]
    [msg] = await queue.index.messages("atrn.example")
    assert dict(msg.recipients) == {"a@atrn.example": DELIVERED, "b@atrn.example": PENDING,
                                    "c@atrn.example": FAILED}
    await queue.settle(again, {"b@atrn.example": Outcome(DELIVERED, "250 ok")})
    await queue.sync()  # removals of finished messages are batched
    assert await queue.held("atrn.example") == []
    assert await queue.index.stats("atrn.example") == {"messages": 0, "bytes": 0}
    [notice] = [spool.read_envelope(n, BOUNCE) for n in spool.ids(BOUNCE)]
    assert notice.about == qid
    assert [(r.address, r.state, r.reason) for r in notice.recipients] == [
        ("c@atrn.example", FAILED, "550 no")]


async def test_reindex_rebuilds_a_lost_index_exactly(queue: HoldQueue, index: Index) -> None:
    await hold(queue, atrn_example=["a@atrn.example"], second_example=["c@second.example"])
    await hold(queue, atrn_example=["d@atrn.example"])
    before = {d: await index.messages(d) for d in await index.domains()}
    await index.redis.flushall()
    report = await queue.reindex()
    assert (report.messages, report.domains, report.corrupt) == (3, 2, 0)
    after = {d: await index.messages(d) for d in await index.domains()}
    assert after == before
    assert await index.stats("atrn.example") == {"messages": 2, "bytes": 2 * len(BODY)}


async def test_reindex_drops_entries_whose_files_are_gone(
        queue: HoldQueue, spool: Spool, index: Index) -> None:
    qid = (await hold(queue, atrn_example=["a@atrn.example"]))["atrn.example"]
    spool.path(qid).unlink()
    await queue.reindex()
    assert await queue.held("atrn.example") == []


async def test_a_stale_index_entry_is_dropped_when_met(queue: HoldQueue, spool: Spool) -> None:
    qid = (await hold(queue, atrn_example=["a@atrn.example"]))["atrn.example"]
    spool.path(qid).unlink()
    assert await queue.load("atrn.example", qid) is None
    assert await queue.held("atrn.example") == []


async def test_corrupt_file_is_quarantined_not_delivered(queue: HoldQueue, spool: Spool) -> None:
    qid = (await hold(queue, atrn_example=["a@atrn.example"]))["atrn.example"]
    path = spool.path(qid)
    path.write_bytes(path.read_bytes()[:-3])
    assert await queue.load("atrn.example", qid) is None
    assert (spool.corrupt / qid).exists()


async def test_a_failed_index_write_leaves_no_unacknowledged_file(queue: HoldQueue, spool: Spool,
                                                                  index: Index) -> None:
    # A WRONGTYPE error from Redis stands in for "the index is unusable".
    await index.redis.set(keys.deferred("atrn.example"), "not a zset")
    try:
        await hold(queue, atrn_example=["a@atrn.example"])
    except Exception as exc:
        assert "WRONGTYPE" in str(exc)
    else:
        raise AssertionError("commit should have failed")
    assert list(spool.ids()) == []


async def test_one_lease_per_domain_released_only_by_its_holder(index: Index) -> None:
    first, second = index.new_token(), index.new_token()
    assert await index.acquire("atrn.example", first, 30)
    assert not await index.acquire("atrn.example", second, 30)
    assert not await index.release("atrn.example", second)
    assert await index.renew("atrn.example", first, 30)
    assert not await index.renew("atrn.example", second, 30)
    assert await index.release("atrn.example", first)
    assert await index.acquire("atrn.example", second, 30)

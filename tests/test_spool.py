"""The spool is the record: durable, validated, and never half a message."""

from __future__ import annotations

import dataclasses
import os

import pytest

from odmr_bridge.spool import (
    BOUNCE,
    DEFERRED,
    DELIVERED,
    HOLD,
    TRAILER,
    CorruptQueueFile,
    Envelope,
    Recipient,
    Spool,
    UnknownQueueId,
    new_qid,
    valid_qid,
)

BODY = b"Subject: hi\r\n\r\n.leading dot\r\n\xe9t\xe9 8-bit\r\n"


def envelope(domain: str = "atrn.example",
             rcpts: tuple[str, ...] = ("a@atrn.example",)) -> Envelope:
    return Envelope(qid=new_qid(), domain=domain, sender="s@x.test", arrival=1.5,
                    size=len(BODY), recipients=[Recipient(r) for r in rcpts],
                    mail_options=["BODY=8BITMIME"])


def test_committed_message_reads_back_byte_for_byte(spool: Spool) -> None:
    env = envelope()
    spool.commit([(env, BODY)])
    with spool.open_body(env.qid) as (body, read_env):
        assert body.read() == BODY
    assert read_env == env
    assert list(spool.incoming.iterdir()) == []


def test_commit_of_several_domains_is_all_or_nothing(spool: Spool) -> None:
    good = envelope()
    bad = envelope("second.example")
    bad.qid = "not/a/qid"  # cannot be created in incoming/
    with pytest.raises(OSError):
        spool.commit([(good, BODY), (bad, BODY)])
    assert list(spool.deferred.iterdir()) == []
    assert list(spool.incoming.iterdir()) == []


@pytest.mark.parametrize("cut", [1, len(TRAILER), len(TRAILER) + 5, 200])
def test_truncated_file_is_not_a_message(spool: Spool, cut: int) -> None:
    env = envelope()
    spool.commit([(env, BODY)])
    path = spool.path(env.qid)
    os.truncate(path, path.stat().st_size - cut)
    with pytest.raises(CorruptQueueFile):
        spool.read_envelope(env.qid)


def test_garbage_file_is_not_a_message(spool: Spool) -> None:
    (spool.deferred / "25XQYNF0NHQW54RM").write_bytes(b"ODMRQ 1\n{not json\n")
    with pytest.raises(CorruptQueueFile):
        spool.read_envelope("25XQYNF0NHQW54RM")


def test_unknown_or_malformed_ids_are_refused(spool: Spool) -> None:
    with pytest.raises(UnknownQueueId):
        spool.read_envelope("../../etc/passwd")
    with pytest.raises(UnknownQueueId):
        spool.read_envelope(new_qid())


def test_rewrite_keeps_body_and_records_recipient_states(spool: Spool) -> None:
    env = envelope(rcpts=("a@atrn.example", "b@atrn.example"))
    spool.commit([(env, BODY)])
    env.recipients[0].state = DELIVERED
    spool.rewrite(env)
    with spool.open_body(env.qid) as (body, read_env):
        assert body.read() == BODY
    assert [r.state for r in read_env.recipients] == [DELIVERED, "pending"]


def test_place_writes_a_new_envelope_with_another_messages_body(spool: Spool) -> None:
    original = envelope()
    spool.commit([(original, BODY)])
    notice = dataclasses.replace(original, qid=new_qid(), about=original.qid)
    spool.place(notice, original.qid, DEFERRED, BOUNCE)
    with spool.open_body(notice.qid, BOUNCE) as (body, read_env):
        assert body.read() == BODY
    assert read_env.about == original.qid
    assert list(spool.ids()) == [original.qid]
    assert list(spool.incoming.iterdir()) == []


def test_move_and_find_follow_a_message_between_queues(spool: Spool) -> None:
    env = envelope()
    spool.commit([(env, BODY)])
    assert spool.find(env.qid) == DEFERRED
    spool.move(env.qid, DEFERRED, HOLD)
    assert spool.find(env.qid) == HOLD
    assert list(spool.ids()) == []
    with pytest.raises(UnknownQueueId):
        spool.move(env.qid, DEFERRED, HOLD)


def test_remove_drops_a_message(spool: Spool) -> None:
    env = envelope()
    spool.commit([(env, BODY)])
    spool.remove(env.qid)
    assert list(spool.ids()) == []
    with pytest.raises(UnknownQueueId):
        spool.find(env.qid)


def test_clear_incoming_removes_unacknowledged_leftovers(spool: Spool) -> None:
    (spool.incoming / new_qid()).write_bytes(b"half a mess")
    assert spool.clear_incoming() == 1
    assert list(spool.incoming.iterdir()) == []


def test_queue_ids_are_unique_and_valid() -> None:
    ids = {new_qid() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(valid_qid(q) for q in ids)

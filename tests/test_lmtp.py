"""LMTP intake (RFC 2033) against the running bridge."""

from __future__ import annotations

import email.utils
from pathlib import Path

from odmr_bridge.spool import Spool
from tests.peers import Bridge, RedisServer
from tests.wire import Wire, lmtp_send

BODY = b"Subject: t\r\n\r\nhello\r\n"


def test_lhlo_advertises_what_rfc_2033_and_postfix_need(bridge: Bridge) -> None:
    w = Wire(bridge.lmtp_port)
    w.reply()
    code, lines = w.command("LHLO mx.test")
    assert code == 250
    for ext in ("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"):
        assert ext in lines
    assert any(line.startswith("SIZE ") for line in lines)


def test_one_reply_per_accepted_recipient_naming_the_queue_id(bridge: Bridge) -> None:
    replies = lmtp_send(bridge.lmtp_port, "s@x.test",
                        ["a@atrn.example", "b@atrn.example", "c@second.example"], BODY)
    assert [code for code, _ in replies] == [250, 250, 250]
    held = {m["domain"]: m["queue_id"] for m in bridge.held()}
    assert f"queued as {held['atrn.example']}" in replies[0][1]
    assert f"queued as {held['atrn.example']}" in replies[1][1]
    assert f"queued as {held['second.example']}" in replies[2][1]


def test_recipient_outside_the_atrn_domains_is_tempfailed(bridge: Bridge) -> None:
    replies = lmtp_send(bridge.lmtp_port, "s@x.test", ["x@elsewhere.example", "a@atrn.example"],
                        BODY)
    assert replies[0][0] == 450 and replies[0][1].startswith("4.1.2")
    assert replies[1][0] == 250
    [msg] = bridge.held()
    assert [r["address"] for r in msg["recipients"]] == ["a@atrn.example"]


def test_null_sender_is_accepted_and_kept(bridge: Bridge) -> None:
    assert lmtp_send(bridge.lmtp_port, "", ["a@atrn.example"], BODY)[0][0] == 250
    assert bridge.held()[0]["sender"] == ""


def test_message_over_the_size_limit_is_refused(tmp_path: Path, redis_url: str) -> None:
    b = Bridge(tmp_path / "b", redis_url, extra_env={"ODMR_BRIDGE_LMTP_MAX_MESSAGE_SIZE": "1000"})
    b.add_domain("atrn.example", "cust", "pw")
    b.start()
    try:
        w = Wire(b.lmtp_port)
        w.reply()
        w.command("LHLO mx.test")
        assert w.command("MAIL FROM:<s@x.test> SIZE=5000")[0] == 552
        # Without SIZE the limit shows at the end of DATA: once per recipient (RFC 2033).
        replies = lmtp_send(b.lmtp_port, "s@x.test", ["a@atrn.example", "b@atrn.example"],
                            (b"x" * 500 + b"\r\n") * 5)
        assert [code for code, _ in replies] == [552, 552]
        assert b.held() == []
    finally:
        b.stop()


def test_overlong_line_is_refused_once_per_recipient(bridge: Bridge) -> None:
    replies = lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example", "b@atrn.example"],
                        b"x" * 3000 + b"\r\n")
    assert [code for code, _ in replies] == [500, 500]
    assert bridge.held() == []


def test_redis_down_gives_451_and_keeps_no_file(tmp_path: Path) -> None:
    private = RedisServer(tmp_path / "redis")
    private.start()
    b = Bridge(tmp_path / "b", private.url)
    b.add_domain("atrn.example", "cust", "pw")
    b.start()
    try:
        private.stop()
        replies = lmtp_send(b.lmtp_port, "s@x.test", ["a@atrn.example", "b@atrn.example"], BODY)
        assert [(code, text[:5]) for code, text in replies] == [(451, "4.3.0"), (451, "4.3.0")]
        assert list((b.spool / "deferred").iterdir()) == []
        private.start()
        assert lmtp_send(b.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)[0][0] == 250
    finally:
        b.stop()
        private.stop()


def test_sigterm_exits_zero(bridge: Bridge) -> None:
    w = Wire(bridge.lmtp_port)  # an idle connection must not hold up the stop
    w.reply()
    assert bridge.stop() == 0


def test_each_held_copy_carries_our_received_line(bridge: Bridge) -> None:
    """RFC 5321 4.4: a server that takes a message for delivery adds a trace line."""
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example", "c@second.example",
                                             "d@second.example"], BODY)
    held = {m["domain"]: m["queue_id"] for m in bridge.held()}
    for domain, rcpt_clause in (("atrn.example", "\r\n\tfor <a@atrn.example>"),
                                ("second.example", "")):
        qid = held[domain]
        with Spool(bridge.spool).open_body(qid) as (body, _):
            content = body.read().decode()
        header, _, rest = content.partition(";\r\n\t")
        assert header == (f"Received: from sender.test ([127.0.0.1])\r\n\tby provider.test "
                          f"(odmr-bridge) with LMTP id {qid}{rcpt_clause}")
        date, _, original = rest.partition("\r\n")
        assert email.utils.parsedate_to_datetime(date).tzinfo is not None
        assert original.encode() == BODY

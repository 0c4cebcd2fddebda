"""The reversed session is an ESMTP client driven by what the customer's EHLO offers."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from bench.benchlib import fast_customer, odmr_login
from tests.conftest import CUSTOMER
from tests.peers import Bridge, hold_on_spool, peak_rss_growth, wait_for
from tests.wire import CustomerMta, Wire, lmtp_send

BODY = b"Subject: t\r\n\r\nhello\r\n"


def reversed_session(bridge: Bridge) -> Wire:
    """Logged in and past ATRN: the next thing is the customer's 220."""
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    return w


def collect(bridge: Bridge, **kwargs: object) -> CustomerMta:
    mta = CustomerMta(reversed_session(bridge), **kwargs)  # type: ignore[arg-type]
    mta.run()
    return mta


def test_dsn_parameters_received_at_intake_are_passed_on(bridge: Bridge) -> None:
    replies = lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY,
                        mail_options="RET=HDRS ENVID=Q+2Bid-1",
                        rcpt_options="NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+40atrn.example")
    assert replies[0][0] == 250
    mta = collect(bridge, ehlo=["customer.test", "DSN", "PIPELINING"])
    mail = next(c for c in mta.commands if c.startswith("MAIL"))
    rcpt = next(c for c in mta.commands if c.startswith("RCPT"))
    assert "RET=HDRS" in mail and "ENVID=Q+2Bid-1" in mail
    assert rcpt == "RCPT TO:<a@atrn.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+40atrn.example"


def test_dsn_parameters_are_dropped_for_a_customer_without_dsn(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY,
              mail_options="RET=FULL", rcpt_options="NOTIFY=NEVER")
    mta = collect(bridge)
    assert "MAIL FROM:<s@x.test> SIZE=" in " ".join(mta.commands)
    assert not any("NOTIFY" in c or "RET=" in c for c in mta.commands)
    assert len(mta.messages) == 1


def test_malformed_dsn_parameters_are_refused_at_intake(bridge: Bridge) -> None:
    w = Wire(bridge.lmtp_port)
    w.reply()
    w.command("LHLO mx.test")
    assert w.command("MAIL FROM:<s@x.test> RET=MAYBE")[0] == 501
    assert w.command("MAIL FROM:<s@x.test>")[0] == 250
    assert w.command("RCPT TO:<a@atrn.example> NOTIFY=NEVER,SUCCESS")[0] == 501


def test_helo_is_used_when_the_customer_refuses_ehlo(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
    mta = collect(bridge, refuse_ehlo=True)
    assert [c.split(" ")[0] for c in mta.commands[:2]] == ["EHLO", "HELO"]
    assert len(mta.messages) == 1
    assert mta.commands[2] == "MAIL FROM:<s@x.test>"  # no ESMTP parameters after HELO


def test_a_message_over_the_customers_size_limit_is_not_sent(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["big@atrn.example"], b"x" * 900 + b"\r\n")
    lmtp_send(bridge.lmtp_port, "s@x.test", ["small@atrn.example"], BODY)
    mta = collect(bridge, ehlo=["customer.test", "SIZE 500"])
    assert [m[1] for m in mta.messages] == [["small@atrn.example"]]
    assert bridge.held() == []
    assert len(list((bridge.spool / "bounce").iterdir())) == 1  # the bounce, not yet sent
    assert bridge.logged("dsn=5.3.4, status=bounced")


def test_smtputf8_mail_to_a_customer_without_smtputf8_fails_permanently(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s\u00e9@x.test", ["a@atrn.example"], BODY,
              mail_options="SMTPUTF8")
    mta = collect(bridge, ehlo=["customer.test", "8BITMIME"])
    assert mta.messages == []
    assert bridge.logged("dsn=5.6.7, status=bounced")


def test_smtputf8_mail_goes_to_a_customer_with_smtputf8(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s\u00e9@x.test", ["a@atrn.example"], BODY,
              mail_options="SMTPUTF8")
    mta = collect(bridge, ehlo=["customer.test", "8BITMIME", "SMTPUTF8"])
    assert [m[0] for m in mta.messages] == ["s\u00e9@x.test"]
    assert "SMTPUTF8" in next(c for c in mta.commands if c.startswith("MAIL"))


def test_a_50_mb_body_is_streamed_from_the_spool_with_flat_memory(tmp_path: Path,
                                                                  redis_url: str) -> None:
    # Intake is not what is measured here: the message goes on the spool.
    line = b"y" * 98 + b"\r\n"
    hold_on_spool(tmp_path / "b", b"Subject: big\r\n\r\n" + line * (50 * 1024 * 1024 // len(line)))
    b = Bridge(tmp_path / "b", redis_url)
    b.add_domain("atrn.example", *CUSTOMER)
    b.start()
    try:
        assert b.process is not None
        with peak_rss_growth(b.process.pid) as grown:
            conn = odmr_login(b.odmr_port, *CUSTOMER)
            assert conn.command("ATRN atrn.example")[0] == 250
            assert fast_customer(conn) == 1
        assert b.held() == []
        assert grown[0] < 10 * 1024, f"RSS grew by {grown[0]} KiB"
    finally:
        b.stop()


def held_count(bridge: Bridge) -> int:
    return len(bridge.held())


def test_a_421_from_the_customer_ends_the_session_at_once(bridge: Bridge) -> None:
    for n in range(5):
        lmtp_send(bridge.lmtp_port, "s@x.test", [f"r{n}@atrn.example"], BODY)
    mta = CustomerMta(reversed_session(bridge), mail_limit=2)
    with pytest.raises(ConnectionError):  # the bridge closes; it sends no QUIT
        mta.run()
    refused = max(i for i, c in enumerate(mta.commands) if c.startswith("MAIL"))
    assert mta.commands[refused + 1:] == []  # nothing after the MAIL that got 421
    assert len(mta.messages) == 2
    assert held_count(bridge) == 3
    assert bridge.logged("session ended early: 421 4.7.0")
    assert len(collect(bridge).messages) == 3  # the rest, in the next session


def test_limits_mailmax_leaves_the_rest_for_the_next_session(bridge: Bridge) -> None:
    for n in range(3):
        lmtp_send(bridge.lmtp_port, "s@x.test", [f"r{n}@atrn.example"], BODY)
    mta = collect(bridge, ehlo=["customer.test", "LIMITS MAILMAX=2"])
    assert len(mta.messages) == 2 and mta.commands[-1] == "QUIT"
    assert held_count(bridge) == 1
    assert bridge.logged("LIMITS MAILMAX=2 reached")
    assert len(collect(bridge).messages) == 1


def test_limits_rcptmax_splits_a_message_into_transactions_of_that_size(bridge: Bridge
                                                                        ) -> None:
    rcpts = [f"r{n}@atrn.example" for n in range(5)]
    lmtp_send(bridge.lmtp_port, "s@x.test", rcpts, BODY)
    mta = collect(bridge, ehlo=["customer.test", "PIPELINING", "LIMITS RCPTMAX=2"])
    assert [m[1] for m in mta.messages] == [rcpts[0:2], rcpts[2:4], rcpts[4:]]
    assert all(m[2] == BODY for m in mta.messages)
    assert held_count(bridge) == 0


def test_the_next_message_goes_out_behind_the_previous_body(bridge: Bridge) -> None:
    # RFC 2920 3.1: content may be the first "command" of a group, so the
    # next MAIL, RCPT and DATA follow a body without waiting for its reply:
    # one round trip per message on a slow link, not two.
    for n in range(3):
        lmtp_send(bridge.lmtp_port, "s@x.test", [f"r{n}@atrn.example"], BODY)
    mta = collect(bridge, ehlo=["customer.test", "PIPELINING"], pause_before_data_reply=0.2)
    assert len(mta.messages) == 3 and held_count(bridge) == 0
    assert [a.split(b"\r\n")[0][:10] for a in mta.ahead] == [b"MAIL FROM:", b"MAIL FROM:", b""]
    assert mta.ahead[0].endswith(b"DATA\r\n")  # the whole group, and nothing beyond it
    assert mta.commands[-1] == "QUIT"


def test_without_pipelining_each_body_waits_for_its_reply(bridge: Bridge) -> None:
    for n in range(2):
        lmtp_send(bridge.lmtp_port, "s@x.test", [f"r{n}@atrn.example"], BODY)
    mta = collect(bridge, pause_before_data_reply=0.2)
    assert len(mta.messages) == 2 and mta.ahead == [b"", b""]


def test_a_421_to_a_body_with_the_next_group_in_flight_loses_nothing(bridge: Bridge) -> None:
    for n in range(4):
        lmtp_send(bridge.lmtp_port, "s@x.test", [f"r{n}@atrn.example"], BODY)
    mta = collect(bridge, ehlo=["customer.test", "PIPELINING"], pause_before_data_reply=0.1,
                  data_replies={2: "421 4.3.2 customer.test shutting down"})
    assert len(mta.messages) == 1
    assert mta.ahead[1].startswith(b"MAIL FROM:")  # the third was on its way
    assert bridge.logged("dsn=4.3.2, status=deferred")
    assert bridge.logged("session ended early: 421 4.3.2")
    assert held_count(bridge) == 3
    assert len(collect(bridge).messages) == 3  # the second, third and fourth, next time
    assert held_count(bridge) == 0


def test_a_421_to_the_last_body_ends_the_session_without_quit(bridge: Bridge) -> None:
    for n in range(2):
        lmtp_send(bridge.lmtp_port, "s@x.test", [f"r{n}@atrn.example"], BODY)
    mta = CustomerMta(reversed_session(bridge), ehlo=["customer.test", "PIPELINING"],
                      closes_after_421=False,
                      data_replies={2: "421 4.3.2 customer.test shutting down"})
    with pytest.raises(ConnectionError):  # the bridge closes, having sent nothing more
        mta.run()
    assert mta.commands[-1] == "DATA" and "QUIT" not in mta.commands
    assert held_count(bridge) == 1
    assert bridge.logged("session ended early: 421 4.3.2")


def test_delivered_files_give_their_disk_space_back_by_the_sessions_end(bridge: Bridge
                                                                       ) -> None:
    # Delivered files are closed in batches off the event loop; none may stay
    # open (deleted, but still taking disk space) once the session is over.
    lmtp_send(bridge.lmtp_port, "s@x.test", ["big@atrn.example"],
              (b"x" * 998 + b"\r\n") * 1200)  # 1.2 MB: closed at once, not batched
    for n in range(3):
        lmtp_send(bridge.lmtp_port, "s@x.test", [f"r{n}@atrn.example"], BODY)
    assert len(collect(bridge, ehlo=["customer.test", "PIPELINING"]).messages) == 4
    assert bridge.process is not None
    fds = Path(f"/proc/{bridge.process.pid}/fd")

    def deleted_spool_files() -> list[str]:
        targets = []
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                targets.append(os.readlink(fd))
        return [t for t in targets if t.startswith(str(bridge.spool)) and "(deleted)" in t]

    wait_for(lambda: deleted_spool_files() == [], timeout=5, what="delivered files closed")

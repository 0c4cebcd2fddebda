"""ODMR (RFC 2645) conformance over raw sockets against the running bridge.

The test plays the customer, and after the reversal also the customer's MTA,
so every reply of the reversed session is under its control.
"""

from __future__ import annotations

from tests.conftest import CUSTOMER
from tests.peers import Bridge, wait_for
from tests.wire import CustomerMta, Wire, lmtp_send


def send_lmtp(bridge: Bridge, rcpts: list[str], body: bytes = b"Subject: t\r\n\r\nhi\r\n",
              sender: str = "s@x.test", mail_options: str = "") -> None:
    replies = lmtp_send(bridge.lmtp_port, sender, rcpts, body, mail_options)
    assert [code for code, _ in replies] == [250] * len(rcpts), replies


def held_ids(bridge: Bridge, domain: str) -> list[str]:
    return [m["queue_id"] for m in bridge.held(domain)]


def test_ehlo_lists_auth_cram_md5_and_atrn(bridge: Bridge) -> None:
    w = Wire(bridge.odmr_port)
    code, _greeting = w.reply()
    assert code == 220
    code, lines = w.command("EHLO shortname")  # fetchmail sends a short name
    assert code == 250
    assert "ATRN" in lines
    [auth] = [line for line in lines if line.startswith("AUTH ")]
    assert "CRAM-MD5" in auth.split()[1:]


def test_atrn_before_auth_is_530(bridge: Bridge) -> None:
    w = Wire(bridge.odmr_port)
    w.reply()
    w.command("EHLO c")
    assert w.command("ATRN atrn.example")[0] == 530


def test_wrong_password_is_535_and_moves_no_mail(bridge: Bridge) -> None:
    send_lmtp(bridge, ["a@atrn.example"])
    w = Wire(bridge.odmr_port)
    w.reply()
    w.command("EHLO c")
    assert w.cram_md5(CUSTOMER[0], "wrong")[0] == 535
    assert w.command("ATRN atrn.example")[0] == 530
    assert len(held_ids(bridge, "atrn.example")) == 1
    assert CUSTOMER[1] not in bridge.log_text()


def test_domain_the_user_may_not_collect_is_450(bridge: Bridge) -> None:
    send_lmtp(bridge, ["a@foreign.example"])
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN foreign.example")[0] == 450
    assert w.command("ATRN atrn.example,foreign.example")[0] == 450
    assert len(held_ids(bridge, "foreign.example")) == 1


def test_no_mail_is_453_and_the_session_stays_open(bridge: Bridge) -> None:
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 453
    assert w.command("NOOP")[0] == 250
    assert w.command("ATRN ATRN.Example.")[0] == 453  # again, and case-insensitively
    assert w.command("QUIT")[0] == 221


def test_malformed_atrn_argument_is_501(bridge: Bridge) -> None:
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example,,x")[0] == 501
    assert w.command("ATRN not_a_domain!")[0] == 501


def test_mail_transaction_verbs_are_refused_before_reversal(bridge: Bridge) -> None:
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    for verb in ("MAIL FROM:<a@b.c>", "RCPT TO:<a@b.c>", "DATA", "VRFY x", "HELO x"):
        assert w.command(verb)[0] == 502, verb
    assert w.command("RSET")[0] == 250


def test_second_session_for_a_domain_being_collected_gets_451(bridge: Bridge) -> None:
    send_lmtp(bridge, ["a@atrn.example"])
    first = Wire(bridge.odmr_port)
    first.login(*CUSTOMER)
    assert first.command("ATRN atrn.example")[0] == 250
    second = Wire(bridge.odmr_port)
    second.login("other", "other-pass")
    assert second.command("ATRN atrn.example")[0] == 451
    # The first session is reversed: it plays the customer's MTA and goes away.
    first.close()
    wait_for(lambda: "lost connection after ATRN" in bridge.log_text(), what="first to end")
    assert second.command("ATRN atrn.example")[0] == 250


def collect(bridge: Bridge, domains: str = "atrn.example", **kwargs: object) -> CustomerMta:
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command(f"ATRN {domains}")[0] == 250
    mta = CustomerMta(w, **kwargs)  # type: ignore[arg-type]
    mta.run()
    return mta


def test_reversal_delivers_every_held_message_once_with_body_intact(bridge: Bridge) -> None:
    body = b"Subject: x\r\n\r\n.starts with a dot\r\n..two\r\n\xe9t\xe9\r\n"
    send_lmtp(bridge, ["a@atrn.example", "b@atrn.example"], body)
    send_lmtp(bridge, ["c@second.example"])
    mta = collect(bridge, "atrn.example, second.example")
    assert sorted((m[0], tuple(m[1])) for m in mta.messages) == [
        ("s@x.test", ("a@atrn.example", "b@atrn.example")),
        ("s@x.test", ("c@second.example",)),
    ]
    assert body in [m[2] for m in mta.messages]
    assert bridge.held() == []


def test_atrn_without_argument_collects_all_the_users_domains(bridge: Bridge) -> None:
    send_lmtp(bridge, ["a@atrn.example"])
    send_lmtp(bridge, ["c@second.example"])
    mta = collect(bridge, "")
    assert len(mta.messages) == 2


def test_each_recipient_outcome_is_recorded(bridge: Bridge) -> None:
    send_lmtp(bridge, ["ok@atrn.example", "later@atrn.example", "bad@atrn.example"])
    mta = collect(bridge, rcpt_replies={"later@atrn.example": "450 4.2.1 mailbox busy",
                                        "bad@atrn.example": "550 5.1.1 no such user"})
    assert [m[1] for m in mta.messages] == [["ok@atrn.example"]]
    [msg] = bridge.held("atrn.example")
    states = {r["address"]: r["state"] for r in msg["recipients"]}
    assert states == {"ok@atrn.example": "delivered", "later@atrn.example": "pending",
                      "bad@atrn.example": "failed"}
    log = bridge.log_text()
    assert "to=<bad@atrn.example>" in log and "dsn=5.1.1, status=bounced" in log
    assert "dsn=4.2.1, status=deferred" in log
    # Next time only the deferred recipient is tried, and then nothing is held.
    again = collect(bridge)
    assert [m[1] for m in again.messages] == [["later@atrn.example"]]
    assert bridge.held() == []


def test_customer_that_hangs_up_after_250_leaves_mail_held(bridge: Bridge) -> None:
    send_lmtp(bridge, ["a@atrn.example"])
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    w.close()  # what fetchmail does when the customer's MTA is down
    wait_for(lambda: "lost connection after ATRN" in bridge.log_text(), what="disconnect")
    assert len(bridge.held("atrn.example")) == 1
    assert len(collect(bridge).messages) == 1


def test_customer_that_hangs_up_in_data_keeps_the_message(bridge: Bridge) -> None:
    send_lmtp(bridge, ["a@atrn.example"], b"Subject: t\r\n\r\n" + b"line\r\n" * 1000)
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    w.send("220 customer.test")
    assert w.read_line().startswith(b"EHLO")
    w.send("250 customer.test")
    assert w.read_line().startswith(b"MAIL FROM:<s@x.test>")
    w.send("250 ok")
    w.read_line()
    w.send("250 ok")
    assert w.read_line() == b"DATA\r\n"
    w.send("354 go")
    w.read_line()
    w.close()
    wait_for(lambda: "lost connection after ATRN" in bridge.log_text(), what="disconnect")
    assert len(bridge.held("atrn.example")) == 1


def test_8bit_message_is_not_sent_to_a_customer_without_8bitmime(bridge: Bridge) -> None:
    send_lmtp(bridge, ["a@atrn.example"], b"Subject: t\r\n\r\n\xe9\r\n",
              mail_options="BODY=8BITMIME")
    mta = collect(bridge, ehlo=["customer.test"])
    assert mta.messages == []
    assert len(bridge.held("atrn.example")) == 1
    assert bridge.logged("does not offer 8BITMIME")


def test_secrets_never_reach_the_log(bridge: Bridge) -> None:
    send_lmtp(bridge, ["a@atrn.example"])
    collect(bridge)
    log = bridge.log_text()
    assert CUSTOMER[1] not in log
    assert "cram-md5" not in log.lower().replace("sasl_method=cram-md5", "").replace(
        "sasl cram-md5", "")

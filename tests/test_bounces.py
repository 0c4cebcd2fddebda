"""Expiry, bounces and delay warnings: RFC 3464 notices, sent with MAIL FROM:<>.

The host MTA is a real SMTP server (aiosmtpd) in most tests and a real
Postfix in the last one.  Every notice is parsed with Python's ``email``
package, as a sender's mail client would.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import subprocess
import time
from collections.abc import Iterator
from email.message import EmailMessage, Message
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from odmr_bridge.bounce import ReportSettings
from odmr_bridge.lifecycle import Lifecycle, LifecyclePolicy
from odmr_bridge.queue import HoldQueue, Outcome
from odmr_bridge.spool import BOUNCE, DELIVERED, FAILED, PENDING, Recipient, Spool
from tests.conftest import CUSTOMER, need
from tests.peers import Bridge, Postfix, SinkHandler, free_port, smtp_sink, wait_for
from tests.wire import CustomerMta, Wire

BODY = (b"From: Sender <s@x.test>\r\nTo: a@atrn.example\r\nSubject: the original\r\n"
        b"Message-ID: <orig-1@x.test>\r\n\r\nFirst line.\r\n.A line with a leading dot.\r\n")
DAY = 86400.0


class ScriptedMta(SinkHandler):
    """The host MTA: answers DATA with the next scripted reply (then 250)."""

    def __init__(self, replies: list[str] | None = None) -> None:
        super().__init__()
        self.replies = replies or []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.replies:
            return self.replies.pop(0)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def host_mta() -> Iterator[tuple[int, ScriptedMta]]:
    with smtp_sink(ScriptedMta()) as (port, handler):
        yield port, handler  # type: ignore[misc]


def policy(port: int, delay_warning: float = 0.0, size_limit: int = 50_000) -> LifecyclePolicy:
    return LifecyclePolicy(max_hold=5 * DAY, delay_warning=delay_warning, interval=60.0,
                           relay=("127.0.0.1", port),
                           report=ReportSettings("provider.test", 5 * DAY, size_limit))


async def hold(queue: HoldQueue, rcpts: list[Recipient], sender: str = "s@x.test",
               options: list[str] | None = None) -> str:
    held = await queue.commit(sender, options or [], {"atrn.example": rcpts}, BODY)
    return held["atrn.example"].qid


async def customer_answers(queue: HoldQueue, qid: str, answers: dict[str, Outcome],
                           report_success: bool = False) -> None:
    envelope = await queue.load("atrn.example", qid)
    assert envelope is not None
    await queue.settle(envelope, answers, report_success=report_success)
    await queue.sync()


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def report_parts(notice: EmailMessage) -> tuple[str, list[Message], Message]:
    """(human text, delivery-status blocks [per-message, per-recipient...], returned part)."""
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    text, status, returned = notice.iter_parts()
    assert status.get_content_type() == "message/delivery-status"
    blocks = [b for b in status.get_payload() if isinstance(b, Message)]
    content: str = text.get_content()
    return content, blocks, returned


def returned_message(part: Message) -> Message:
    """The original inside a message/rfc822 part."""
    assert part.get_content_type() == "message/rfc822"
    payload = part.get_payload()
    assert isinstance(payload, list) and len(payload) == 1
    inner = payload[0]
    assert isinstance(inner, Message)
    return inner


async def test_a_5xx_from_the_customer_returns_the_message_to_its_sender(
        queue: HoldQueue, spool: Spool, host_mta: tuple[int, ScriptedMta]) -> None:
    port, mta = host_mta
    qid = await hold(queue, [Recipient("a@atrn.example"), Recipient("b@atrn.example")])
    await customer_answers(queue, qid, {
        "a@atrn.example": Outcome(FAILED, "550 5.1.1 <a@atrn.example>: no such user"),
        "b@atrn.example": Outcome(DELIVERED, "250 2.0.0 ok")})
    report = await Lifecycle(queue, policy(port)).run_pass()
    assert (report.sent, report.kept) == (1, 0)
    [(sender, rcpts, raw)] = mta.messages
    assert (sender, rcpts) == ("<>", ["s@x.test"])
    notice = parse(raw)
    assert notice["To"] == "s@x.test" and notice["Auto-Submitted"] == "auto-replied"
    assert notice["From"] == "Mail Delivery System <MAILER-DAEMON@provider.test>"
    text, blocks, returned = report_parts(notice)
    assert qid in text and "<a@atrn.example>: 550 5.1.1" in text
    per_message, [per_rcpt] = blocks[0], blocks[1:]  # b was delivered: not reported
    assert per_message["Reporting-MTA"] == "dns; provider.test"
    assert per_rcpt["Final-Recipient"] == "rfc822; a@atrn.example"
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <a@atrn.example>: no such user"
    original = returned_message(returned)
    assert original["Subject"] == "the original"
    assert ".A line with a leading dot." in original.get_payload()
    assert list(spool.ids(BOUNCE)) == []
    assert await queue.held("atrn.example") == []


async def test_ret_hdrs_and_envelope_id_are_honoured(
        queue: HoldQueue, host_mta: tuple[int, ScriptedMta]) -> None:
    port, mta = host_mta
    qid = await hold(queue, [Recipient("a@atrn.example", ["ORCPT=rfc822;A+2Bx@atrn.example"])],
                     options=["RET=HDRS", "ENVID=env+2B1"])
    await customer_answers(queue, qid, {"a@atrn.example": Outcome(FAILED, "554 rejected")})
    await Lifecycle(queue, policy(port)).run_pass()
    _, blocks, returned = report_parts(parse(mta.messages[0][2]))
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: the original" in returned.get_payload()
    assert "First line." not in returned.get_payload()
    assert blocks[0]["Original-Envelope-Id"] == "env+1"
    assert blocks[1]["Original-Recipient"] == "rfc822; A+x@atrn.example"
    assert blocks[1]["Status"] == "5.0.0"  # no enhanced code in the reply: the class default


async def test_a_large_original_comes_back_as_headers_only(
        queue: HoldQueue, host_mta: tuple[int, ScriptedMta]) -> None:
    port, mta = host_mta
    qid = await hold(queue, [Recipient("a@atrn.example")])
    await customer_answers(queue, qid, {"a@atrn.example": Outcome(FAILED, "552 5.3.4 big")})
    await Lifecycle(queue, policy(port, size_limit=len(BODY) - 1)).run_pass()
    _, _, returned = report_parts(parse(mta.messages[0][2]))
    assert returned.get_content_type() == "text/rfc822-headers"


async def test_notify_never_and_the_null_sender_get_no_notice(
        queue: HoldQueue, spool: Spool, host_mta: tuple[int, ScriptedMta]) -> None:
    port, mta = host_mta
    never = await hold(queue, [Recipient("a@atrn.example", ["NOTIFY=NEVER"]),
                               Recipient("b@atrn.example", ["NOTIFY=SUCCESS"])])
    null = await hold(queue, [Recipient("c@atrn.example")], sender="")
    await customer_answers(queue, never, {"a@atrn.example": Outcome(FAILED, "550 no"),
                                          "b@atrn.example": Outcome(FAILED, "550 no")})
    await customer_answers(queue, null, {"c@atrn.example": Outcome(FAILED, "550 no")})
    await Lifecycle(queue, policy(port)).run_pass()
    assert mta.messages == []
    assert list(spool.ids(BOUNCE)) == []
    assert await queue.held("atrn.example") == []


async def test_notify_success_is_reported_as_relayed_for_a_customer_without_dsn(
        queue: HoldQueue, host_mta: tuple[int, ScriptedMta]) -> None:
    port, mta = host_mta
    qid = await hold(queue, [Recipient("a@atrn.example", ["NOTIFY=SUCCESS"]),
                             Recipient("b@atrn.example")])
    await customer_answers(queue, qid, {"a@atrn.example": Outcome(DELIVERED, "250 ok"),
                                        "b@atrn.example": Outcome(DELIVERED, "250 ok")},
                           report_success=True)
    await Lifecycle(queue, policy(port)).run_pass()
    [(_, _, raw)] = mta.messages
    notice = parse(raw)
    assert notice["Subject"] == "Successful Mail Delivery Report"
    _, blocks, returned = report_parts(notice)
    assert [b["Action"] for b in blocks[1:]] == ["relayed"]  # b did not ask
    assert returned.get_content_type() == "text/rfc822-headers"


async def test_mail_held_longer_than_max_hold_expires_and_is_returned(
        queue: HoldQueue, host_mta: tuple[int, ScriptedMta]) -> None:
    port, mta = host_mta
    await hold(queue, [Recipient("a@atrn.example")])
    await asyncio.sleep(0.02)
    young = await hold(queue, [Recipient("b@atrn.example")])
    old_arrival, young_arrival = [m.arrival for m in await queue.index.messages("atrn.example")]
    lifecycle = Lifecycle(queue, policy(port))
    assert (await lifecycle.run_pass(now=old_arrival + 5 * DAY - 60)).expired == 0
    between = (old_arrival + young_arrival) / 2
    assert (await lifecycle.run_pass(now=between + 5 * DAY)).expired == 1
    assert await queue.held("atrn.example") == [young]
    _, blocks, _ = report_parts(parse(mta.messages[0][2]))
    assert (blocks[1]["Action"], blocks[1]["Status"]) == ("failed", "4.4.7")
    assert "Diagnostic-Code" not in blocks[1]  # a local event, not a remote reply


async def test_expiry_waits_while_an_atrn_session_collects_the_domain(
        queue: HoldQueue, host_mta: tuple[int, ScriptedMta]) -> None:
    port, _ = host_mta
    await hold(queue, [Recipient("a@atrn.example")])
    lifecycle = Lifecycle(queue, policy(port))
    token = queue.index.new_token()
    assert await queue.index.acquire("atrn.example", token, 60)
    assert (await lifecycle.run_pass(now=time.time() + 6 * DAY)).expired == 0
    await queue.index.release("atrn.example", token)
    assert (await lifecycle.run_pass(now=time.time() + 6 * DAY)).expired == 1


async def test_one_delay_warning_per_message_and_the_mail_stays_held(
        queue: HoldQueue, host_mta: tuple[int, ScriptedMta]) -> None:
    port, mta = host_mta
    qid = await hold(queue, [Recipient("a@atrn.example"),
                             Recipient("b@atrn.example", ["NOTIFY=FAILURE"])])
    lifecycle = Lifecycle(queue, policy(port, delay_warning=4 * 3600))
    later = time.time() + 4 * 3600 + 1
    assert (await lifecycle.run_pass(now=later)).warned == 1
    assert (await lifecycle.run_pass(now=later + 3600)).warned == 0
    [(_, _, raw)] = mta.messages
    notice = parse(raw)
    assert notice["Subject"].startswith("Delayed Mail")
    text, blocks, returned = report_parts(notice)
    assert "you do not need to resend" in text
    [rcpt] = blocks[1:]  # b asked for failures only
    assert rcpt["Final-Recipient"] == "rfc822; a@atrn.example"
    assert (rcpt["Action"], rcpt["Status"]) == ("delayed", "4.4.1")
    assert "Will-Retry-Until" in rcpt
    assert returned.get_content_type() == "text/rfc822-headers"
    assert await queue.held("atrn.example") == [qid]
    envelope = await queue.load("atrn.example", qid)
    assert envelope is not None and envelope.warned
    assert [r.state for r in envelope.recipients] == [PENDING, PENDING]


async def test_a_notice_the_host_mta_tempfails_is_kept_and_sent_later(
        queue: HoldQueue, spool: Spool) -> None:
    with smtp_sink(ScriptedMta(["451 4.3.0 try again"])) as (port, mta):
        qid = await hold(queue, [Recipient("a@atrn.example")])
        await customer_answers(queue, qid, {"a@atrn.example": Outcome(FAILED, "550 no")})
        lifecycle = Lifecycle(queue, policy(port))
        assert (await lifecycle.run_pass()).kept == 1
        assert len(list(spool.ids(BOUNCE))) == 1
        assert (await lifecycle.run_pass()).sent == 1
        assert len(mta.messages) == 1
        assert list(spool.ids(BOUNCE)) == []


async def test_a_notice_waits_while_the_host_mta_is_down(queue: HoldQueue) -> None:
    qid = await hold(queue, [Recipient("a@atrn.example")])
    await customer_answers(queue, qid, {"a@atrn.example": Outcome(FAILED, "550 no")})
    report = await Lifecycle(queue, policy(free_port())).run_pass()  # nothing listens
    assert (report.sent, report.kept) == (0, 1)


async def test_a_notice_refused_for_good_is_dropped(queue: HoldQueue, spool: Spool,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with smtp_sink(ScriptedMta(["550 5.1.1 sender unknown here"])) as (port, mta):
        qid = await hold(queue, [Recipient("a@atrn.example")])
        await customer_answers(queue, qid, {"a@atrn.example": Outcome(FAILED, "550 no")})
        assert (await Lifecycle(queue, policy(port)).run_pass()).sent == 1
    assert list(spool.ids(BOUNCE)) == [] and mta.messages == []
    assert "status=bounced" in caplog.text and "sender unknown here" in caplog.text


async def test_a_utf8_sender_gets_its_bounce_over_smtputf8(
        queue: HoldQueue, host_mta: tuple[int, ScriptedMta]) -> None:
    port, mta = host_mta  # an MTA that offers SMTPUTF8
    qid = await hold(queue, [Recipient("a@atrn.example")], sender="s\u00e9@x.test",
                     options=["SMTPUTF8"])
    await customer_answers(queue, qid, {"a@atrn.example": Outcome(FAILED, "550 no")})
    assert (await Lifecycle(queue, policy(port)).run_pass()).sent == 1
    assert mta.messages[0][1] == ["s\u00e9@x.test"]


async def test_a_utf8_sender_behind_a_host_mta_without_smtputf8_is_given_up(
        queue: HoldQueue, caplog: pytest.LogCaptureFixture) -> None:
    mta = SinkHandler()
    port = free_port()
    controller = Controller(mta, hostname="127.0.0.1", port=port, enable_SMTPUTF8=False)
    controller.start()
    try:
        qid = await hold(queue, [Recipient("a@atrn.example")], sender="s\u00e9@x.test",
                         options=["SMTPUTF8"])
        other = await hold(queue, [Recipient("b@atrn.example")])
        await customer_answers(queue, qid, {"a@atrn.example": Outcome(FAILED, "550 no")})
        await customer_answers(queue, other, {"b@atrn.example": Outcome(FAILED, "550 no")})
        report = await Lifecycle(queue, policy(port)).run_pass()
    finally:
        controller.stop()
    assert (report.sent, report.kept) == (2, 0)  # one given up, the other sent
    assert [m[1] for m in mta.messages] == [["s@x.test"]]
    assert "does not offer SMTPUTF8" in caplog.text


async def test_messages_on_hold_do_not_expire(queue: HoldQueue, spool: Spool,
                                              host_mta: tuple[int, ScriptedMta]) -> None:
    port, mta = host_mta
    qid = await hold(queue, [Recipient("a@atrn.example")])
    spool.move(qid, "deferred", "hold")
    await queue.index.move("atrn.example", qid, hold=True)
    assert (await Lifecycle(queue, policy(port)).run_pass(now=time.time() + 9 * DAY)).expired == 0
    assert [m.qid for m in await queue.index.messages("atrn.example")] == [qid]
    assert mta.messages == []


def test_a_bounce_travels_through_postfix_back_to_the_sender(tmp_path: Path,
                                                            redis_url: str) -> None:
    """swaks -> Postfix -> bridge; the customer says 550; the DSN goes out via Postfix."""
    need("postfix", "postconf", "postmap", "swaks")
    bridge = Bridge(tmp_path / "bridge", redis_url)
    bridge.add_domain("atrn.example", *CUSTOMER)
    with smtp_sink() as (sender_mx, senders_mail):
        postfix = Postfix(["atrn.example"], {
            "atrn.example": f"odmr:inet:[127.0.0.1]:{bridge.lmtp_port}",
            "origin.test": f"smtp:[127.0.0.1]:{sender_mx}"})  # the sender's own MX
        bridge.env["ODMR_BRIDGE_BOUNCE_RELAY"] = f"127.0.0.1:{postfix.smtp_port}"
        postfix.start()
        bridge.start()
        try:
            subprocess.run(["swaks", "--server", f"127.0.0.1:{postfix.smtp_port}",
                            "--from", "sender@origin.test", "--to", "gone@atrn.example",
                            "--header", "Subject: will bounce", "--silent", "2"],
                           check=True, capture_output=True, timeout=60)
            wait_for(lambda: len(bridge.held()) == 1, timeout=30, what="the message held")
            w = Wire(bridge.odmr_port)
            w.login(*CUSTOMER)
            assert w.command("ATRN atrn.example")[0] == 250
            CustomerMta(w, {"gone@atrn.example": "550 5.1.1 <gone@atrn.example>: unknown"}).run()
            wait_for(lambda: len(senders_mail.messages) == 1, timeout=60,
                     what="the bounce at the sender's MX")
        finally:
            bridge.stop()
            postfix.stop()
    [(envelope_sender, rcpts, raw)] = senders_mail.messages
    assert (envelope_sender, rcpts) == ("<>", ["sender@origin.test"])
    notice = parse(raw)
    assert notice["Received"] is not None  # it really went through Postfix
    _, blocks, returned = report_parts(notice)
    assert (blocks[1]["Action"], blocks[1]["Status"]) == ("failed", "5.1.1")
    assert returned_message(returned)["Subject"] == "will bounce"
    assert bridge.logged("status=sent (failed notice for")

"""End to end with real peers: swaks -> Postfix -> LMTP -> bridge -> ATRN -> fetchmail -> sink."""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CUSTOMER, need
from tests.peers import Bridge, Postfix, fetchmail, smtp_sink, wait_for

pytestmark = pytest.mark.e2e

MESSAGES = {
    "dot": (["dot@atrn.example"],
            b"Subject: dot\r\n\r\n.a line that starts with a dot\r\n.\r\n..\r\nend\r\n"),
    "8bit": (["eight@atrn.example"],
             "Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n"
             "Content-Transfer-Encoding: 8bit\r\n\r\nUmlaute: \u00e4\u00f6\u00fc \u00df\r\n"
             .encode()),
    "two": (["one@atrn.example", "two@atrn.example"],
            b"Subject: two recipients\r\n\r\nfor both of you\r\n"),
}


@pytest.fixture
def postfix(tmp_path: Path, bridge: Bridge) -> Iterator[Postfix]:
    need("postfix", "postconf", "postmap", "swaks", "fetchmail")
    nexthop = f"odmr:inet:[127.0.0.1]:{bridge.lmtp_port}"
    pf = Postfix(["atrn.example", "second.example"],
                 {"atrn.example": nexthop, "second.example": nexthop})
    pf.start()
    yield pf
    pf.stop()


def swaks(postfix: Postfix, rcpts: list[str], data: bytes,
          sender: str = "sender@origin.test") -> None:
    headers = f"From: <{sender}>\r\nTo: {', '.join(rcpts)}\r\n".encode()
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{postfix.smtp_port}", "--from", sender,
         "--to", ",".join(rcpts), "--data", "-", "--silent", "2"],
        input=headers + data.replace(b"\r\n", b"\n"), capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def smtplib_send(postfix: Postfix, rcpts: list[str], data: bytes,
                 sender: str = "sender@origin.test") -> None:
    """Byte-exact submission (swaks appends a blank line to --data)."""
    headers = f"From: <{sender}>\r\nTo: {', '.join(rcpts)}\r\n".encode()
    options = ["BODY=8BITMIME"] if any(b > 127 for b in data) else []
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port) as smtp:
        assert smtp.sendmail(sender, rcpts, headers + data, mail_options=options) == {}


def body_of(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[1]


def test_mail_through_postfix_is_collected_by_fetchmail_once_and_intact(
        tmp_path: Path, bridge: Bridge, postfix: Postfix) -> None:
    for rcpts, data in MESSAGES.values():
        smtplib_send(postfix, rcpts, data)
    wait_for(lambda: postfix.queue_size() == 0 and len(bridge.held("atrn.example")) == 3,
             timeout=30, what="Postfix to hand everything to the bridge")
    assert "status=sent" in postfix.maillog()

    with smtp_sink() as (port, sink):
        result = fetchmail(tmp_path, bridge.odmr_port, *CUSTOMER, ["atrn.example"], port)
        assert result.returncode == 0, result.stdout + result.stderr
        got = {tuple(sorted(rcpts)): content for _, rcpts, content in sink.messages}

    assert len(sink.messages) == 3  # exactly once each
    for rcpts, data in MESSAGES.values():
        delivered = got[tuple(sorted(rcpts))]
        assert body_of(delivered) == body_of(data)
    assert all(sender == "sender@origin.test" for sender, _, _ in sink.messages)
    assert bridge.held() == []
    assert "Mail queue is empty" in bridge.cli("queue", "list").stdout


def test_fetchmail_exit_codes_follow_the_atrn_replies(tmp_path: Path, bridge: Bridge,
                                                      postfix: Postfix) -> None:
    with smtp_sink() as (port, sink):
        no_mail = fetchmail(tmp_path, bridge.odmr_port, *CUSTOMER, ["atrn.example"], port)
        assert no_mail.returncode == 0 and "453" in no_mail.stdout + no_mail.stderr
        refused = fetchmail(tmp_path, bridge.odmr_port, *CUSTOMER, ["foreign.example"], port)
        assert refused.returncode == 4
        bad_password = fetchmail(tmp_path, bridge.odmr_port, CUSTOMER[0], "wrong",
                                 ["atrn.example"], port)
        assert bad_password.returncode != 0
        assert sink.messages == []


def test_customer_mta_down_loses_nothing(tmp_path: Path, bridge: Bridge,
                                         postfix: Postfix) -> None:
    swaks(postfix, ["a@atrn.example"], b"Subject: later\r\n\r\nkept\r\n")
    wait_for(lambda: len(bridge.held("atrn.example")) == 1, timeout=30, what="intake")
    with smtp_sink() as (port, _):
        dead_port = port
    down = fetchmail(tmp_path, bridge.odmr_port, *CUSTOMER, ["atrn.example"], dead_port)
    assert down.returncode == 2  # fetchmail: "socket error" towards its smtphost
    wait_for(lambda: "lost connection after ATRN" in bridge.log_text(), what="the drop")
    assert len(bridge.held("atrn.example")) == 1
    with smtp_sink() as (port, sink):
        assert fetchmail(tmp_path, bridge.odmr_port, *CUSTOMER, ["atrn.example"],
                         port).returncode == 0
    assert len(sink.messages) == 1 and bridge.held() == []

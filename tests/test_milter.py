"""The admission milter, through a real Postfix: the sending client sees the refusals."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import CUSTOMER, need
from tests.peers import (
    ROOT,
    Bridge,
    Postfix,
    SinkHandler,
    free_port,
    port_open,
    smtp_sink,
    wait_for,
)

pytestmark = pytest.mark.e2e


class MilterProcess:
    def __init__(self, bridge: Bridge, **env: str) -> None:
        self.port = free_port()
        self.env = {**bridge.env, "ODMR_BRIDGE_MILTER_LISTEN": f"inet:{self.port}@127.0.0.1",
                    **env}
        self.log = bridge.directory / "milter.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "odmr_bridge", "milter"],
                                            env=self.env, cwd=ROOT, stdout=out, stderr=out)
        wait_for(lambda: port_open(self.port), what="the milter")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


Setup = tuple[Bridge, "MilterProcess", Postfix, SinkHandler]


@pytest.fixture
def setup(bridge: Bridge) -> Iterator[tuple[Bridge, MilterProcess, Postfix, SinkHandler]]:
    need("postfix", "postconf", "postmap")
    for domain, options in (("atrn.example", ["--max-messages", "1"]),
                            ("second.example", ["--max-message-size", "1000",
                                                "--recipient", "ok@second.example"])):
        bridge.cli("domain", "set", domain, *options)
    milter = MilterProcess(bridge)
    milter.start()
    with smtp_sink() as (sink_port, sink):
        nexthop = f"odmr:inet:[127.0.0.1]:{bridge.lmtp_port}"
        postfix = Postfix(["atrn.example", "second.example", "other.example"],
                          {"atrn.example": nexthop, "second.example": nexthop,
                           "other.example": f"smtp:[127.0.0.1]:{sink_port}"})
        postfix.start(run=False)
        postfix.postconf("-e", f"smtpd_milters = inet:127.0.0.1:{milter.port}")
        postfix.run()
        try:
            yield bridge, milter, postfix, sink
        finally:
            postfix.stop()
            milter.stop()


def send(postfix: Postfix, rcpt: str, body: bytes = b"Subject: t\r\n\r\nhi\r\n") -> None:
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port) as smtp:
        smtp.sendmail("s@origin.test", [rcpt], body)


def test_over_quota_domain_gets_452_at_rcpt(setup: Setup
                                            ) -> None:
    bridge, _, postfix, _ = setup
    send(postfix, "a@atrn.example")
    wait_for(lambda: len(bridge.held("atrn.example")) == 1, timeout=30, what="the first")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(postfix, "b@atrn.example")
    code, text = refused.value.recipients["b@atrn.example"]
    assert code == 452 and text.startswith(b"4.2.2")


def test_over_size_message_gets_552_and_unknown_recipient_550(
        setup: Setup) -> None:
    _, _, postfix, _ = setup
    with pytest.raises(smtplib.SMTPDataError) as too_big:
        send(postfix, "ok@second.example",
             b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 100)
    error = too_big.value.smtp_error
    assert too_big.value.smtp_code == 552
    assert (error.decode() if isinstance(error, bytes) else error).startswith("5.3.4")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as unknown:
        send(postfix, "nobody@second.example")
    code, text = unknown.value.recipients["nobody@second.example"]
    assert code == 550 and text.startswith(b"5.1.1")


def test_mail_for_other_domains_passes_untouched(setup: Setup) -> None:
    bridge, _, postfix, sink = setup
    send(postfix, "x@other.example")
    wait_for(lambda: len(sink.messages) == 1, timeout=30, what="delivery to other.example")
    assert sink.messages[0][1] == ["x@other.example"]
    assert bridge.held() == []


def test_milter_down_means_tempfail_not_acceptance(
        setup: Setup) -> None:
    bridge, milter, postfix, _ = setup
    milter.stop()
    with pytest.raises(smtplib.SMTPException) as failed:
        send(postfix, "a@atrn.example")
    code = getattr(failed.value, "smtp_code", None) or next(
        iter(getattr(failed.value, "recipients", {}).values()), (None,))[0]
    assert code is not None and 400 <= code < 500, failed.value
    assert bridge.held() == []
    assert CUSTOMER[1] not in milter.log.read_text()


def test_redis_unreachable_means_tempfail_for_atrn_domains(setup: Setup) -> None:
    bridge, _, postfix, sink = setup
    blind = MilterProcess(bridge, ODMR_BRIDGE_REDIS_URL="unix:///nonexistent/redis.sock")
    blind.start()
    try:
        postfix.postconf("-e", f"smtpd_milters = inet:127.0.0.1:{blind.port}")
        subprocess.run(["postfix", "-c", str(postfix.etc), "reload"], check=True,
                       capture_output=True)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            send(postfix, "a@atrn.example")
        code, text = refused.value.recipients["a@atrn.example"]
        assert code == 451 and text.startswith(b"4.3.0")
        send(postfix, "x@other.example")  # other domains still pass
        wait_for(lambda: len(sink.messages) == 1, timeout=30, what="other.example")
    finally:
        blind.stop()

"""What operators watch: the Prometheus endpoint and Postfix-style logs (stderr or syslog)."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CUSTOMER
from tests.peers import Bridge, wait_for
from tests.wire import CustomerMta, Wire, lmtp_send

BODY = b"Subject: watched\r\n\r\nbody\r\n"


def scrape(bridge: Bridge) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{bridge.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_show_the_hold_queue_and_what_happened(bridge: Bridge) -> None:
    sessions = ("odmr_bridge_odmr_sessions_total", ())
    before = scrape(bridge)
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
    lmtp_send(bridge.lmtp_port, "s@x.test", ["b@atrn.example", "c@second.example"], BODY)
    lmtp_send(bridge.lmtp_port, "s@x.test", ["c@atrn.example"], BODY)
    w = Wire(bridge.odmr_port)
    assert w.reply()[0] == 220 and w.command("EHLO customer")[0] == 250
    assert w.cram_md5(CUSTOMER[0], "wrong password")[0] == 535
    w.close()
    m = scrape(bridge)
    atrn, second = (("domain", "atrn.example"),), (("domain", "second.example"),)
    assert m[("odmr_bridge_held_messages", atrn)] == 3
    assert m[("odmr_bridge_held_messages", second)] == 1
    held_sizes = [message["message_size"] for message in bridge.held("atrn.example")]
    assert all(size > len(BODY) for size in held_sizes)  # with our Received: line
    assert m[("odmr_bridge_held_bytes", atrn)] == sum(held_sizes)
    assert 0 < m[("odmr_bridge_oldest_message_age_seconds", atrn)] < 60
    assert m[("odmr_bridge_intake_messages_total", ())] == 4
    assert m[("odmr_bridge_auth_failures_total", (("mechanism", "CRAM-MD5"),))] == 1
    assert m[sessions] - before[sessions] == 1
    assert m[("odmr_bridge_redis_up", ())] == 1
    assert m[("odmr_bridge_notices_waiting", ())] == 0

    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    CustomerMta(w, {"b@atrn.example": "451 4.2.0 later",
                    "c@atrn.example": "550 5.1.1 unknown"}).run()
    m = scrape(bridge)
    assert m[("odmr_bridge_recipients_total", (("status", "sent"),))] == 1
    assert m[("odmr_bridge_recipients_total", (("status", "deferred"),))] == 1
    assert m[("odmr_bridge_recipients_total", (("status", "bounced"),))] == 1
    # The bounce waits: the fixture's host MTA (bounce.relay) does not answer.
    tried = ("odmr_bridge_notices_total", (("kind", "failed"), ("status", "deferred")))
    wait_for(lambda: scrape(bridge).get(tried, 0) >= 1, what="the bounce to be tried")
    assert scrape(bridge)[("odmr_bridge_notices_waiting", ())] == 1
    assert m[("odmr_bridge_atrn_total", (("result", "reversed"),))] == 1
    # The delivered message leaves the index right after the session's QUIT.
    wait_for(lambda: scrape(bridge).get(("odmr_bridge_held_messages", atrn)) == 1,
             what="the delivered message to leave the index")


def test_logs_go_to_syslog_with_the_mail_facility(tmp_path: Path, redis_url: str,
                                                  syslog_socket: tuple[Path, socket.socket]
                                                  ) -> None:
    path, sock = syslog_socket
    bridge = Bridge(tmp_path / "bridge", redis_url, extra_env={
        "ODMR_BRIDGE_LOG_TARGET": "syslog", "ODMR_BRIDGE_LOG_SYSLOG_SOCKET": str(path)})
    bridge.add_domain("atrn.example", *CUSTOMER)
    bridge.start()
    try:
        [(_, reply)] = lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
        qid = reply.split()[-1]
        lines: list[str] = []
        while not any(f"{qid}: from=<s@x.test>" in line for line in lines):
            lines.append(sock.recv(65536).decode())
    finally:
        bridge.stop()
    received, queued = [line for line in lines if qid in line][:2]
    # <22> = facility mail (2) * 8 + severity info (6); then Postfix's "program/service[pid]:".
    assert received.startswith("<22>odmr-bridge/smtpd[")
    assert f"]: {qid}: client=sender.test[127.0.0.1]" in received
    assert queued.startswith("<22>odmr-bridge/lmtp[")
    size = int(queued.split("size=")[1].split(",")[0])
    assert size > len(BODY)  # with our Received: line
    assert f"]: {qid}: from=<s@x.test>, size={size}, nrcpt=1" in queued
    assert bridge.log_text() == ""  # nothing on stderr


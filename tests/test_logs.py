"""The logs say what Postfix's would, so that the tools operators run on Postfix's
logs (pflogsumm, grep for a queue ID) work on ours."""

from __future__ import annotations

import logging
import logging.handlers
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

from odmr_bridge import logs
from tests.conftest import CUSTOMER, need
from tests.peers import Bridge, self_signed_certificate, wait_for
from tests.wire import CustomerMta, Wire, lmtp_send

BODY = b"Subject: t\r\n\r\n" + b"hello\r\n" * 100


def collect(bridge: Bridge, rcpt_replies: dict[str, str] | None = None,
            tls: bool = False) -> CustomerMta:
    w = Wire(bridge.odmr_port)
    assert w.reply()[0] == 220
    assert w.command("EHLO customer")[0] == 250
    if tls:
        w.starttls()
        assert w.command("EHLO customer")[0] == 250
    assert w.cram_md5(*CUSTOMER)[0] == 235
    assert w.command("ATRN atrn.example")[0] == 250
    mta = CustomerMta(w, rcpt_replies)
    mta.run()
    w.close()
    return mta


def qid_lines(bridge: Bridge, qid: str) -> list[str]:
    return [line for line in bridge.log_text().splitlines() if f": {qid}: " in line]


def test_pflogsumm_counts_our_syslog_as_it_counts_postfixs(
        tmp_path: Path, redis_url: str, syslog_socket: tuple[Path, socket.socket]) -> None:
    need("pflogsumm")
    path, sock = syslog_socket
    collected: list[str] = []
    done = threading.Event()
    reading = threading.Thread(target=_receive, args=(sock, collected, done), daemon=True)
    reading.start()
    bridge = Bridge(tmp_path / "bridge", redis_url, extra_env={
        "ODMR_BRIDGE_LOG_TARGET": "syslog", "ODMR_BRIDGE_LOG_SYSLOG_SOCKET": str(path)})
    bridge.add_domain("atrn.example", *CUSTOMER)
    bridge.start()
    try:
        for sender, rcpts in (("alice@one.test", ["a@atrn.example"]),
                              ("bob@two.test", ["b@atrn.example", "c@atrn.example"]),
                              ("alice@one.test", ["d@atrn.example"])):
            assert all(code == 250 for code, _ in lmtp_send(bridge.lmtp_port, sender, rcpts,
                                                            BODY))
        collect(bridge, {"c@atrn.example": "450 4.2.0 mailbox busy",
                         "d@atrn.example": "550 5.1.1 no such user"})
        wait_for(lambda: any("disconnect from" in line and "atrn=atrn.example" in line
                             for line in collected), what="the session end")
    finally:
        bridge.stop()
    done.set()
    reading.join()
    # What rsyslog writes to /var/log/mail.log: time stamp, host name, the message.
    stamp = time.strftime("%b %e %H:%M:%S")
    maillog = tmp_path / "mail.log"
    maillog.write_text("".join(f"{stamp} mx {re.sub(r'^<[0-9]+>', '', line)}\n"
                               for line in collected))
    report = subprocess.run(["pflogsumm", "--syslog-name=odmr-bridge", "--smtpd-stats",
                             str(maillog)], capture_output=True, text=True, check=True).stdout
    totals = dict((name.strip(), int(count)) for count, name in re.findall(
        r"^\s+(\d+)\s+([a-z][a-z /-]+?)\s*(?:\(|$)", report, re.MULTILINE))
    assert totals["received"] == 3
    assert totals["delivered"] == 2
    assert totals["deferred"] == 1
    assert totals["bounced"] == 1
    assert totals["senders"] == 2
    assert totals["sending hosts/domains"] == 2
    assert totals["recipients"] == 2  # the delivered ones, as pflogsumm counts
    assert totals["bytes received"] >= 3 * len(BODY)
    assert totals["bytes delivered"] >= 2 * len(BODY)


def _receive(sock: socket.socket, into: list[str], done: threading.Event) -> None:
    """Read syslog datagrams, as syslogd would, until *done* and nothing more comes."""
    sock.settimeout(0.2)
    while True:
        try:
            into.append(sock.recv(65536).decode().rstrip("\x00\n"))
        except TimeoutError:
            if done.is_set():
                return


def test_a_delivery_logs_delay_since_arrival_then_removed(bridge: Bridge) -> None:
    [(_, reply)] = lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
    qid = reply.split()[-1]
    time.sleep(1.2)  # held a while before the customer comes
    collect(bridge)
    wait_for(lambda: any(line.endswith(f"{qid}: removed") for line in qid_lines(bridge, qid)),
             what="the removal")
    lines = qid_lines(bridge, qid)
    assert [re.sub(r".*: (\w+)=.*|.*: ", r"\1", line) for line in lines] == [
        "client", "from", "to", "removed"]
    sent = lines[2]
    delay = float(re.search(r"delay=([0-9.]+),", sent).group(1))  # type: ignore[union-attr]
    assert 1.2 <= delay < 10
    a, b, c, d = (float(x) for x in re.search(  # type: ignore[union-attr]
        r"delays=([0-9.]+)/([0-9.]+)/([0-9.]+)/([0-9.]+),", sent).groups())
    assert a == 0 and 1.2 <= b < 10 and c < 1 and d < 1
    assert "status=sent" in sent and lines[3].endswith(f"{qid}: removed")


def test_every_session_ends_with_one_line_saying_who_what_and_how(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example", "b@atrn.example"], BODY)
    collect(bridge, {"b@atrn.example": "451 4.3.0 later"})
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    CustomerMta(w, {"b@atrn.example": "451 4.3.0 later"}).run()
    w.close()
    wait_for(lambda: bridge.log_text().count("atrn=atrn.example") >= 2, what="session ends")
    ends = [line for line in bridge.log_text().splitlines() if "atrn=atrn.example" in line]
    assert ends[-1].endswith("user=cust atrn=atrn.example delivered=0 deferred=1 failed=0 "
                             "tls=none")
    # A session that only asked: its refusal and its end are logged too.
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN second.example")[0] == 453
    w.command("QUIT")
    w.close()
    wait_for(lambda: "user=cust atrn=- tls=none" in bridge.log_text(),
             what="the 453 session end")
    assert bridge.logged("ATRN user=cust domains=second.example: no mail (453)")


def test_a_tls_session_is_logged_as_postfix_logs_one(tmp_path: Path, redis_url: str) -> None:
    cert, key = self_signed_certificate(tmp_path)
    b = Bridge(tmp_path / "b", redis_url, extra_env={
        "ODMR_BRIDGE_TLS_CERT_FILE": str(cert), "ODMR_BRIDGE_TLS_KEY_FILE": str(key)})
    b.add_domain("atrn.example", *CUSTOMER)
    b.start()
    try:
        lmtp_send(b.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
        collect(b, tls=True)
        wait_for(lambda: "tls=TLS" in b.log_text(), what="the TLS session's end")
        log = b.log_text()
        assert re.search(r"Anonymous TLS connection established from \[127\.0\.0\.1\]:\d+: "
                         r"TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)", log)
        assert re.search(r"disconnect from .* delivered=1 deferred=0 failed=0 tls=TLSv1\.[23]",
                         log)
    finally:
        b.stop()


def test_debug_logging_does_not_log_its_own_log_file(tmp_path: Path, redis_url: str) -> None:
    # The log file sits beside the watched customers file (tests.peers.Bridge).
    b = Bridge(tmp_path / "b", redis_url, extra_env={"ODMR_BRIDGE_LOG_LEVEL": "debug"})
    b.start()
    try:
        time.sleep(2)
        lines = len(b.log_text().splitlines())
        time.sleep(2)
        assert len(b.log_text().splitlines()) - lines < 20
    finally:
        b.stop()


def test_a_record_costs_no_walk_up_the_stack() -> None:
    # logging._srcfile is the knob the logging HOWTO ("Optimization") names
    # for this; if a Python release moves it, this fails rather than every
    # line quietly paying for the caller's file and line again.
    assert hasattr(logging, "_srcfile")
    saved = (logging._srcfile, logging.logThreads, logging.logMultiprocessing)
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    logger = logging.getLogger("odmr_bridge.test_logs")
    seen = logging.handlers.BufferingHandler(10)
    logger.addHandler(seen)
    logger.propagate = False
    try:
        logs.setup("info")
        logger.info("one line")
        record = seen.buffer[0]
        assert (record.pathname, record.lineno) == ("(unknown file)", 0)
        assert record.threadName is None and record.process  # the line shows the PID
    finally:
        logs.finish()
        logging._srcfile, logging.logThreads, logging.logMultiprocessing = saved
        root.handlers[:], root.level = saved_root
        logger.removeHandler(seen)

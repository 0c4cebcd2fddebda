"""kill -9 at random moments, during intake from a real Postfix and during ATRN drains.

Three threads run at once: a sender submitting numbered messages to Postfix
(which hands them to the bridge over LMTP), a customer collecting with ATRN
again and again, and a killer that SIGKILLs the bridge at a random moment
after each start, ``ODMR_CRASH_KILLS`` times (default 50).  Then the bridge
runs undisturbed until Postfix's queue is empty and the customer has
everything.  The promise checked:

- no message is lost: every message Postfix accepted reaches the customer;
- a message arrives twice only if its delivery was in flight at a kill:
  either the bridge was killed after the customer accepted it and before
  the session ended (the customer saw the session die right after it), or
  it was killed after committing it and before Postfix had its reply
  (Postfix logs "message may be sent more than once").

``scripts/crash-test [KILLS]`` runs this alone and prints the counts.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import smtplib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import CUSTOMER, need
from tests.peers import Bridge, Postfix, wait_for
from tests.wire import CustomerMta, Wire, lmtp_send

KILLS = int(os.environ.get("ODMR_CRASH_KILLS", "50"))
_CRASH_ID = re.compile(rb"^X-Crash-Id: (\d+)\r?$", re.MULTILINE)
_POSTFIX_QID_OF = re.compile(r"postfix/cleanup\[\d+\]: (\w+): message-id=<crash-(\d+)@test>")
# The LMTP client itself lost the bridge after the final dot (not the "delivery
# temporarily suspended" echo of that for other messages).
_MAYBE_TWICE = re.compile(r"postfix/lmtp\[\d+\]: (\w+): .*status=deferred \(lost connection "
                          r"with \S+ while sending end of data -- message may be sent more than")


@dataclass
class Customer:
    """Collects with ATRN until told to stop; remembers what it got and when sessions died."""

    received: list[int] = field(default_factory=list)
    in_flight_at_kill: set[int] = field(default_factory=set)
    sessions: int = 0
    died: int = 0

    def collect_once(self, port: int) -> bool:
        """One ODMR session; True when it ended normally (QUIT or no mail)."""
        try:
            w = Wire(port, timeout=10)
        except OSError:
            return False
        mta = CustomerMta(w)
        try:
            w.login(*CUSTOMER)
            code, _ = w.command("ATRN atrn.example")
            if code != 250:
                w.close()
                return code == 453
            self.sessions += 1
            mta.run()
            return True
        except (OSError, AssertionError, UnicodeDecodeError):
            if mta.messages:
                self.died += 1
                # Accepted by us, perhaps not yet recorded by the bridge.
                self.in_flight_at_kill.add(crash_id(mta.messages[-1][2]))
            return False
        finally:
            self.received.extend(crash_id(data) for _, _, data in mta.messages)
            w.close()


def crash_id(data: bytes) -> int:
    match = _CRASH_ID.search(data)
    assert match is not None, data[:300]
    return int(match.group(1))


def send(postfix: Postfix, n: int) -> None:
    message = (f"From: <s@origin.test>\r\nTo: <c{n}@atrn.example>\r\n"
               f"Message-ID: <crash-{n}@test>\r\nX-Crash-Id: {n}\r\nSubject: crash {n}\r\n\r\n"
               + "body line\r\n" * 40)
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=30) as smtp:
        smtp.sendmail("s@origin.test", [f"c{n}@atrn.example"], message.encode())


def test_kill_9_during_intake_and_drains_loses_nothing(tmp_path: Path, redis_url: str) -> None:
    need("postfix", "postconf", "postmap")
    # A killed session's lease blocks its domain until it expires: keep that short.
    bridge = Bridge(tmp_path / "bridge", redis_url,
                    extra_env={"ODMR_BRIDGE_ODMR_LEASE_SECONDS": "1.5"})
    bridge.add_domain("atrn.example", *CUSTOMER)
    postfix = Postfix(["atrn.example"],
                      {"atrn.example": f"odmr:inet:[127.0.0.1]:{bridge.lmtp_port}"})
    postfix.start(run=False)
    # Retry a dead bridge within a second or two, not Postfix's 5 minutes.
    postfix.postconf("-e", "queue_run_delay=1s", "minimal_backoff_time=1s",
                     "maximal_backoff_time=2s", "odmr_destination_concurrency_limit=4")
    postfix.run()
    customer = Customer()
    sent: list[int] = []
    stop = threading.Event()

    def sender() -> None:
        while not stop.is_set():
            send(postfix, len(sent))
            sent.append(len(sent))
            time.sleep(0.05)

    def collector() -> None:
        while not stop.is_set():
            if not customer.collect_once(bridge.odmr_port):
                time.sleep(0.05)

    threads = [threading.Thread(target=sender), threading.Thread(target=collector)]
    rng = random.Random(int(os.environ.get("ODMR_CRASH_SEED", "2645")))
    try:
        bridge.start()
        for thread in threads:
            thread.start()
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.05, 1.0))
            bridge.stop(signal.SIGKILL)
            bridge.start()
        stop.set()
        for thread in threads:
            thread.join(60)
        # Undisturbed now: Postfix hands over the rest, the customer collects it.
        postfix.flush()
        wait_for(lambda: postfix.queue_size() == 0, timeout=120, interval=0.5,
                 what="Postfix to hand everything to the bridge")
        wait_for(lambda: customer.collect_once(bridge.odmr_port) and not bridge.held(),
                 timeout=120, interval=0.2, what="the customer to collect everything")
    finally:
        stop.set()
        bridge.stop(signal.SIGKILL)
        maillog = postfix.maillog()
        postfix.stop()

    postfix_ids = {qid: int(n) for qid, n in _POSTFIX_QID_OF.findall(maillog)}
    maybe_twice_at_intake = {postfix_ids[q] for q in _MAYBE_TWICE.findall(maillog)
                             if q in postfix_ids}
    counts: dict[int, int] = {}
    for n in customer.received:
        counts[n] = counts.get(n, 0) + 1
    lost = sorted(set(sent) - set(counts))
    duplicates = sorted(n for n, c in counts.items() if c > 1)
    unexplained = sorted(set(duplicates) - customer.in_flight_at_kill - maybe_twice_at_intake)
    print(f"\ncrash test: kills={KILLS} sent={len(sent)} received={len(customer.received)} "
          f"distinct={len(counts)} lost={len(lost)} duplicates={len(duplicates)} "
          f"(in flight at a kill: drain={len(customer.in_flight_at_kill)}, "
          f"intake={len(maybe_twice_at_intake)}) sessions={customer.sessions} "
          f"sessions_killed={customer.died}")
    assert len(sent) > KILLS
    assert lost == [], f"lost: {lost}"
    assert unexplained == [], f"duplicates not in flight at a kill: {unexplained}"
    assert set(counts) <= set(sent)


def test_kill_9_mid_drain_with_the_next_message_in_flight_loses_nothing(
        tmp_path: Path, redis_url: str) -> None:
    # A pipelined drain keeps one message in flight (its body sent, the next
    # group behind it, its reply not yet read) and closes and indexes its
    # removals in batches: a kill at any point costs at most that message twice.
    bridge = Bridge(tmp_path / "bridge", redis_url)
    bridge.add_domain("atrn.example", *CUSTOMER)
    bridge.start()
    rcpts = [f"r{n}@atrn.example" for n in range(300)]
    for rcpt in rcpts:
        lmtp_send(bridge.lmtp_port, "s@x.test", [rcpt], b"Subject: t\r\n\r\n" + b"x\r\n" * 50)
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    first = CustomerMta(w, ehlo=["customer.test", "PIPELINING"])

    def kill_mid_drain() -> None:
        wait_for(lambda: len(first.messages) >= 120, timeout=60, interval=0.001,
                 what="120 messages collected")
        bridge.stop(signal.SIGKILL)

    killer = threading.Thread(target=kill_mid_drain)
    killer.start()
    with contextlib.suppress(ConnectionError, OSError):  # the bridge died under it
        first.run()
    killer.join()
    assert 120 <= len(first.messages) < 300
    bridge.start()  # frees its own leases and mends the index from the spool
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    rest = CustomerMta(w, ehlo=["customer.test", "PIPELINING"])
    rest.run()
    got = [m[1][0] for m in first.messages + rest.messages]
    print(f"\nkill -9 mid-drain: {len(first.messages)} collected before, "
          f"{len(rest.messages)} after, {len(got) - len(set(got))} duplicate(s)")
    assert sorted(set(got)) == sorted(rcpts)  # none lost
    assert len(got) - len(set(got)) <= 1  # at most the one in flight at the kill
    assert bridge.held() == []

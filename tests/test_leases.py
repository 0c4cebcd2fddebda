"""One ATRN session per domain, and no lock-out: not after a crash, not after QUIT.

A lease token names the node that holds it; a bridge that restarts frees the
leases of its previous run at once, and a session frees its domains before
it sends QUIT.  Two live sessions still never serve one domain.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from odmr_bridge.accounts import AccountsFile
from tests.conftest import CUSTOMER
from tests.peers import Bridge
from tests.wire import CustomerMta, Wire, lmtp_send

BODY = b"Subject: lease\r\n\r\nhello\r\n"


def hold(bridge: Bridge, n: int) -> None:
    for i in range(n):
        [(code, _)] = lmtp_send(bridge.lmtp_port, "s@x.test", [f"r{i}@atrn.example"], BODY)
        assert code == 250


def logged_in(bridge: Bridge) -> Wire:
    w = Wire(bridge.odmr_port, timeout=10)
    w.login(*CUSTOMER)
    return w


def stall_after_one_message(w: Wire) -> None:
    """A slow customer: takes one message, then never answers the next MAIL."""
    w.send("220 customer.test ESMTP")
    assert w.read_line().startswith(b"EHLO")
    w.send("250 customer.test")
    for answer in ("250 2.1.0 Ok", "250 2.1.5 Ok", "354 go ahead"):
        w.read_line()
        w.send(answer)
    while w.read_line() != b".\r\n":
        pass
    w.send("250 2.0.0 Ok: delivered")
    assert w.read_line().startswith(b"MAIL")  # and no answer: the session hangs here


def test_after_kill_9_mid_drain_the_customer_collects_within_2_seconds(bridge: Bridge) -> None:
    hold(bridge, 3)
    w = logged_in(bridge)
    assert w.command("ATRN atrn.example")[0] == 250
    stall_after_one_message(w)
    bridge.stop(signal.SIGKILL)  # the lease of the dead session stays in Redis
    w.close()
    bridge.start()
    started = time.monotonic()
    codes = []
    while True:
        again = logged_in(bridge)
        code, _ = again.command("ATRN atrn.example")
        codes.append(code)
        if code == 250 or time.monotonic() - started > 2:
            break
        again.close()
        time.sleep(0.1)
    assert code == 250, f"ATRN answered {codes} for {time.monotonic() - started:.1f} s"
    mta = CustomerMta(again)
    mta.run()
    again.close()
    assert len(mta.messages) == 2  # the first was delivered before the kill
    assert bridge.held() == []


def test_atrn_right_after_quit_is_never_busy(bridge: Bridge) -> None:
    codes = []
    for _ in range(20):
        hold(bridge, 1)
        session, next_session = logged_in(bridge), logged_in(bridge)
        assert session.command("ATRN atrn.example")[0] == 250
        CustomerMta(session).run()  # returns right after answering QUIT
        code, _ = next_session.command("ATRN atrn.example")  # at once
        codes.append(code)
        if code == 250:
            CustomerMta(next_session).run()
        session.close()
        next_session.close()
    assert set(codes) <= {250, 453}, codes


def test_two_live_sessions_never_serve_one_domain(bridge: Bridge, tmp_path: Path,
                                                  redis_url: str) -> None:
    hold(bridge, 2)
    # Another instance on this host, the same Redis and the same spool.
    other = Bridge(tmp_path / "other", redis_url,
                   extra_env={"ODMR_BRIDGE_SPOOL_DIR": str(bridge.spool)})
    AccountsFile(other.accounts).add_domain("atrn.example", [CUSTOMER[0]],
                                            {CUSTOMER[0]: CUSTOMER[1].encode()})
    other.start()
    try:
        first = logged_in(bridge)
        assert first.command("ATRN atrn.example")[0] == 250  # and it has not greeted yet
        second = logged_in(bridge)
        assert second.command("ATRN atrn.example")[0] == 451
        second.close()
        # A restart of the other instance frees its own leases, not this one.
        other.stop(signal.SIGKILL)
        other.start()
        elsewhere = logged_in(other)
        assert elsewhere.command("ATRN atrn.example")[0] == 451
        elsewhere.close()
        assert len(CustomerMta(first).run()) == 2
        first.close()
        done = logged_in(other)
        assert done.command("ATRN atrn.example")[0] == 453
        done.close()
    finally:
        other.stop()

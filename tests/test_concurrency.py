"""One process holds hundreds of ODMR connections without starving any of them."""

from __future__ import annotations

import time

from tests.conftest import CUSTOMER
from tests.peers import Bridge
from tests.wire import CustomerMta, Wire, lmtp_send

CONNECTIONS = 500
# Many customers, as in life: each address stays under the per-client limit (50).
SOURCES = 20


def test_500_connections_idle_authenticated_and_reversed_are_all_served(bridge: Bridge) -> None:
    for i in range(20):
        lmtp_send(bridge.lmtp_port, "s@x.test", [f"r{i}@atrn.example"],
                  b"Subject: t\r\n\r\n" + b"body line\r\n" * 50)
    idle: list[Wire] = []
    authenticated: list[Wire] = []
    for i in range(CONNECTIONS):
        w = Wire(bridge.odmr_port, timeout=30, source=f"127.0.1.{i % SOURCES + 1}")
        assert w.reply()[0] == 220
        (authenticated if i % 2 else idle).append(w)
    for w in authenticated:
        assert w.command("EHLO c")[0] == 250
        assert w.cram_md5("other", "other-pass")[0] == 235

    collector = Wire(bridge.odmr_port, timeout=30)
    collector.login(*CUSTOMER)
    assert collector.command("ATRN atrn.example")[0] == 250
    mta = CustomerMta(collector)
    mta.reply("220 customer.test")
    assert collector.read_line().startswith(b"EHLO")
    # While one session sits reversed mid-dialogue, every other one still answers.
    started = time.monotonic()
    for w in idle + authenticated:
        assert w.command("NOOP")[0] == 250
    assert time.monotonic() - started < 30
    mta.reply("250 customer.test")
    mta.run_after_greeting()
    assert len(mta.messages) == 20
    for w in idle + authenticated:
        assert w.command("QUIT")[0] == 221
        w.close()

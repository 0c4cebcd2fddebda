"""Per-client-address limits on port 366 (Postfix's anvil): one address cannot
take every connection, and running out of descriptors is one log line, not a flood."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from odmr_bridge.anvil import ADMITTED, RATE_EXCEEDED, TOO_MANY_CONNECTIONS, Anvil, AnvilPolicy
from odmr_bridge.replies import TOO_MANY_CONNECTIONS as REFUSAL
from tests.conftest import CUSTOMER
from tests.peers import Bridge, wait_for
from tests.wire import CustomerMta, Wire, lmtp_send

FLOODER = "127.0.0.2"
BODY = b"Subject: t\r\n\r\nhello\r\n"


@pytest.fixture
def limited(tmp_path: Path, redis_url: str) -> Iterator[Bridge]:
    b = Bridge(tmp_path / "bridge", redis_url, extra_env={
        "ODMR_BRIDGE_ODMR_CLIENT_CONNECTION_LIMIT": "10",
        "ODMR_BRIDGE_ODMR_CLIENT_CONNECTION_RATE_LIMIT": "40"})
    b.add_domain("atrn.example", *CUSTOMER)
    b.start()
    yield b
    b.stop()


def greeting(port: int, source: str) -> tuple[Wire, int, str]:
    w = Wire(port, source=source)
    code, lines = w.reply()
    return w, code, lines[0]


def collects_one_message(bridge: Bridge) -> bool:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
    w = Wire(bridge.odmr_port)
    try:
        w.login(*CUSTOMER)
        assert w.command("ATRN atrn.example")[0] == 250
        return len(CustomerMta(w).run()) == 1
    finally:
        w.close()


def test_one_address_past_its_limit_gets_421_while_another_customer_collects(
        limited: Bridge) -> None:
    flood = [greeting(limited.odmr_port, FLOODER) for _ in range(10)]
    assert [code for _, code, _ in flood] == [220] * 10
    w, code, text = greeting(limited.odmr_port, FLOODER)
    assert f"{code} {text}" == REFUSAL
    assert w.read_line() == b""  # and closed
    assert collects_one_message(limited)
    assert limited.logged(f"Connection count limit exceeded for [{FLOODER}]")
    for wire, _, _ in flood:
        wire.close()
    # The slots are free again once the flood's connections are gone.
    wait_for(lambda: greeting(limited.odmr_port, FLOODER)[1] == 220,
             what="a slot freed by closed connections")


def test_connections_per_minute_are_limited_per_address(limited: Bridge) -> None:
    codes = []
    for _ in range(45):
        w, code, _ = greeting(limited.odmr_port, FLOODER)
        codes.append(code)
        w.close()
    assert codes.count(421) >= 5 and codes[:10] == [220] * 10
    assert limited.logged("Connection rate limit exceeded")
    assert greeting(limited.odmr_port, "127.0.0.1")[1] == 220


async def test_instances_share_the_count_and_a_dead_nodes_connections_lapse(
        redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    policy = AnvilPolicy(max_connections=3, max_rate=0, ttl=0.5)
    node_a, node_b = Anvil(client, policy), Anvil(client, policy)
    try:
        verdicts = [(await node.admit("192.0.2.7"))[0] for node in (node_a, node_b, node_a)]
        assert verdicts == [ADMITTED] * 3
        assert (await node_b.admit("192.0.2.7"))[0] == TOO_MANY_CONNECTIONS
        assert (await node_b.admit("192.0.2.8"))[0] == ADMITTED  # another address
        # node_a dies (never releases); its two registrations lapse after ttl.
        await asyncio.sleep(0.6)
        assert (await node_b.admit("192.0.2.7"))[0] == ADMITTED
    finally:
        await client.aclose()


async def test_a_live_nodes_connections_are_renewed_and_released(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    node = Anvil(client, AnvilPolicy(max_connections=1, max_rate=2, window=60, ttl=0.3))
    renewal = asyncio.create_task(node.renew_forever())
    try:
        verdict, connection = await node.admit("192.0.2.9")
        assert verdict == ADMITTED
        await asyncio.sleep(0.5)  # past one ttl: still counted, renewed
        assert (await node.admit("192.0.2.9"))[0] == TOO_MANY_CONNECTIONS
        await node.release("192.0.2.9", connection)
        assert (await node.admit("192.0.2.9"))[0] == RATE_EXCEEDED  # third this minute
    finally:
        renewal.cancel()
        await client.aclose()


def test_out_of_descriptors_is_one_log_line_and_service_resumes(tmp_path: Path,
                                                                  redis_url: str) -> None:
    b = Bridge(tmp_path / "bridge", redis_url,
               extra_env={"ODMR_BRIDGE_ODMR_CLIENT_CONNECTION_LIMIT": "0",
                          "ODMR_BRIDGE_ODMR_CLIENT_CONNECTION_RATE_LIMIT": "0"})
    b.add_domain("atrn.example", *CUSTOMER)
    b.start()
    try:
        assert b.process is not None
        subprocess.run(["prlimit", f"--pid={b.process.pid}", "--nofile=80:80"], check=True)
        flood: list[socket.socket] = []
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", b.odmr_port), 5,
                                         source_address=(FLOODER, 0))
            flood.append(s)
        wait_for(lambda: "not accepting new connections" in b.log_text(),
                 what="the bridge to run out of descriptors")
        time.sleep(2.5)  # asyncio retries accept() every second meanwhile
        for s in flood:
            s.close()
        log = b.log_text()
        assert log.count("not accepting new connections") == 1
        assert "Traceback" not in log
        wait_for(lambda: collects_one_message(b), timeout=20,
                 what="a customer served after the flood")
    finally:
        b.stop()

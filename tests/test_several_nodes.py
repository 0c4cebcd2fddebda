"""Several bridge nodes on one Redis Cluster (or Sentinel set) with the redis store:
any node takes mail, any node serves any customer, losing a node loses nothing.
And with the files store, a second node on the same Redis is refused by name."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CUSTOMER
from tests.peers import Bridge, wait_for
from tests.test_monitoring import scrape
from tests.test_relay import collect
from tests.wire import CustomerMta, Wire, lmtp_send

BODY = b"Subject: t\r\n\r\nheld in Redis\r\n"


def node(tmp_path: Path, name: str, **redis: str) -> Bridge:
    env = {"ODMR_BRIDGE_REDIS_URL": "", "ODMR_BRIDGE_STORE_KIND": "redis",
           "ODMR_BRIDGE_ODMR_LEASE_SECONDS": "3"}
    env.update({f"ODMR_BRIDGE_REDIS_{k.upper()}": v for k, v in redis.items()})
    b = Bridge(tmp_path / name, "", extra_env=env)
    b.add_domain("atrn.example", *CUSTOMER)
    return b


@pytest.fixture
def two_nodes(tmp_path: Path, cluster_nodes: str) -> Iterator[tuple[Bridge, Bridge]]:
    a, b = node(tmp_path, "a", cluster_nodes=cluster_nodes), \
        node(tmp_path, "b", cluster_nodes=cluster_nodes)
    a.start()
    b.start()
    yield a, b
    for n in (a, b):
        if n.process is not None:
            n.stop()


def test_mail_taken_by_node_a_is_listed_on_b_and_collected_there(
        two_nodes: tuple[Bridge, Bridge]) -> None:
    a, b = two_nodes
    for n in range(3):
        assert lmtp_send(a.lmtp_port, "s@x.test", [f"r{n}@atrn.example"], BODY)[0][0] == 250
    assert len(b.held()) == 3 and len(a.held()) == 3
    mta = collect(b)
    assert sorted(m[1][0] for m in mta.messages) == [f"r{n}@atrn.example" for n in range(3)]
    assert all(m[2] == BODY for m in mta.messages)
    assert a.held() == [] and b.held() == []


def test_killing_a_node_mid_drain_loses_nothing_another_node_serves_the_rest(
        two_nodes: tuple[Bridge, Bridge]) -> None:
    a, b = two_nodes
    for n in range(30):
        lmtp_send(b.lmtp_port, "s@x.test", [f"r{n}@atrn.example"], BODY)
    w = Wire(a.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    first = CustomerMta(w)

    def kill_a_after_five() -> None:
        wait_for(lambda: len(first.messages) >= 5, what="five delivered")
        a.stop(signal.SIGKILL)

    killer = threading.Thread(target=kill_a_after_five)
    killer.start()
    with pytest.raises(ConnectionError):
        first.run()
    killer.join()
    w.close()
    # The dead node's lease on the domain lapses (odmr.lease_seconds = 3 here).
    deadline = time.monotonic() + 15
    while True:
        w = Wire(b.odmr_port)
        w.login(*CUSTOMER)
        code = w.command("ATRN atrn.example")[0]
        if code == 250 or time.monotonic() > deadline:
            break
        w.close()
        time.sleep(0.5)
    assert code == 250
    second = CustomerMta(w)
    second.run()
    got = [m[1][0] for m in first.messages + second.messages]
    assert set(got) == {f"r{n}@atrn.example" for n in range(30)}  # nothing lost
    assert len(got) - len(set(got)) <= 1  # at most the one in flight at the kill
    assert b.held() == []


def test_a_second_files_node_on_the_same_redis_is_refused_by_name(tmp_path: Path,
                                                                   redis_url: str) -> None:
    first = Bridge(tmp_path / "first", redis_url)
    first.start()
    try:
        second = Bridge(tmp_path / "second", redis_url)
        with pytest.raises(RuntimeError) as refused:
            second.start()
        message = str(refused.value)
        assert "bridge exited 1" in message
        assert "would strand mail" in message and 'kind = "redis"' in message
        assert str(tmp_path / "first" / "spool") in message
    finally:
        first.stop()


def test_the_same_spool_restarted_is_not_a_second_node(tmp_path: Path, redis_url: str) -> None:
    for _ in range(2):
        b = Bridge(tmp_path / "only", redis_url)
        b.start()
        assert b.stop() == 0


def test_notices_waiting_are_counted_from_redis_on_every_node(
        two_nodes: tuple[Bridge, Bridge]) -> None:
    a, b = two_nodes
    lmtp_send(a.lmtp_port, "s@x.test", ["gone@atrn.example"], BODY)
    collect(a, rcpt_replies={"gone@atrn.example": "550 5.1.1 no such user"})
    # The bounce waits in the store (the fixture's host MTA does not answer).
    waiting = ("odmr_bridge_notices_waiting", ())
    for n in (a, b):
        wait_for(lambda n=n: scrape(n).get(waiting) == 1,
                 what="the notice counted")

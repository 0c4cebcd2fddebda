"""Failures around the redis store, with real processes only: a real Postfix
hands mail to one bridge node and a customer collects it at another; the
Redis master serving a busy domain is killed (-9) in the middle of Postfix's
intake, on a Redis Cluster and behind Sentinel, and nothing Postfix was told
is queued goes missing; a Redis at maxmemory says 452 4.3.1, stores nothing
by halves, and takes mail again once the customer has collected.

The failover tests start their own Redis Cluster / Sentinel set (the
session's are not for killing masters in)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from odmr_bridge import keys
from tests.conftest import CUSTOMER, need
from tests.peers import (
    Bridge,
    Postfix,
    RedisCluster,
    RedisSentinelSet,
    _answers,
    _redis_process,
    _replicas_online,
    fetchmail,
    free_port,
    smtp_sink,
    wait_for,
)
from tests.test_relay import collect
from tests.test_several_nodes import node
from tests.wire import lmtp_send, without_our_trace

DOMAIN = "atrn.example"
BATCHES, PER_BATCH = 20, 10  # 200 messages from smtp-source
# Postfix's log of a delivery to the bridge: the recipient and the bridge's queue ID.
SENT = re.compile(r"to=<([^>]+)>.*status=sent \(250 .*queued as (\w+)\)")
DEFERRED = re.compile(r"to=<([^>]+)>.*status=deferred \((.*)\)$", re.MULTILINE)
OUR_QID = re.compile(rb"\(odmr-bridge\) with LMTP id (\w+)")


@contextlib.contextmanager
def postfix_to(bridge: Bridge) -> Iterator[Postfix]:
    """A real Postfix whose transport map sends atrn.example to *bridge*'s LMTP."""
    need("postfix", "postconf", "postmap", "smtp-source", "fetchmail")
    pf = Postfix([DOMAIN], {DOMAIN: f"odmr:inet:[127.0.0.1]:{bridge.lmtp_port}"})
    pf.start()
    try:
        yield pf
    finally:
        pf.stop()


@contextlib.contextmanager
def running(*nodes: Bridge) -> Iterator[None]:
    for n in nodes:
        n.start()
    try:
        yield
    finally:
        for n in nodes:
            if n.process is not None:
                n.stop()


def delivered_by_postfix(pf: Postfix) -> dict[str, str]:
    """recipient -> the bridge's queue ID, for each status=sent in Postfix's log."""
    return {m.group(1): m.group(2) for m in SENT.finditer(pf.maillog())}


def intake_under_failover(pf: Postfix, fail: Callable[[], None],
                          collector: Bridge) -> None:
    """200 messages through Postfix with smtp-source (each recipient numbered,
    ``<n>b<batch>@atrn.example``), *fail* run once a third of them reached the
    bridge; then Postfix's queue flushed until it is empty, and the customer
    collects at *collector*: every message Postfix logged as sent to the
    bridge arrives, and so does every one smtp-source sent."""
    failed: list[float] = []
    done_at: list[float] = []
    errors: list[BaseException] = []

    def fail_midway() -> None:
        try:
            wait_for(lambda: len(delivered_by_postfix(pf)) >= BATCHES * PER_BATCH // 3,
                     timeout=30, interval=0.05, what="a third of the intake")
            started = time.monotonic()
            fail()
            failed.append(time.monotonic() - started)
            done_at.append(time.monotonic())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    killer = threading.Thread(target=fail_midway)
    killer.start()
    for batch in range(BATCHES):
        subprocess.run(["smtp-source", "-m", str(PER_BATCH), "-s", "2", "-N",
                        "-f", "sender@origin.test", "-t", f"b{batch}@{DOMAIN}",
                        "-S", "failover", f"127.0.0.1:{pf.smtp_port}"],
                       check=True, capture_output=True, timeout=30)
        time.sleep(0.15)
    killer.join(45)
    assert not errors, errors
    assert failed, "the failure was never injected"

    # Postfix retries what the bridge deferred (451) once asked to.
    deadline = time.monotonic() + 40
    while pf.queue_size() and time.monotonic() < deadline:
        pf.flush()
        time.sleep(1)
    assert pf.queue_size() == 0, pf.maillog()[-3000:]
    drained = time.monotonic() - done_at[0]

    expected = {f"{n}b{batch}@{DOMAIN}" for batch in range(BATCHES)
                for n in range(1, PER_BATCH + 1)}
    logged = delivered_by_postfix(pf)
    assert set(logged) == expected  # Postfix delivered everything in the end
    deferrals = [m.groups() for m in DEFERRED.finditer(pf.maillog())]
    deferred = {rcpt for rcpt, _ in deferrals}
    assert deferred, "no message met the failure: it did not happen during intake"
    # The bridge said "try again" (RFC 3463 4.3.0) each time: no lost connection.
    reasons = {re.sub(r"<[^>]+>", "<rcpt>", why) for _, why in deferrals}
    assert all("said: 451 4.3.0 <rcpt>" in why for why in reasons), reasons

    mta = collect(collector)
    got_qids = [q.decode() for raw in mta.raw_messages for q in OUR_QID.findall(raw)]
    got_rcpts = [rcpts[0] for _, rcpts, _ in mta.messages]
    # 0 lost: every queue ID Postfix was given, every recipient smtp-source sent to.
    assert set(logged.values()) <= set(got_qids)
    assert set(got_rcpts) == expected
    message_ids = {re.search(rb"Message-Id: (<[^>]+>)", content).group(1)  # type: ignore[union-attr]
                   for _, _, content in mta.messages}
    assert len(message_ids) == len(expected)
    duplicates = len(got_rcpts) - len(set(got_rcpts))
    print(f"failover took {failed[0]:.1f} s, Postfix's queue empty {drained:.1f} s later; "
          f"{len(deferred)} message(s) deferred by the "
          f"bridge and retried by Postfix; {duplicates} duplicate(s) collected; "
          f"the bridge said: {sorted(reasons)}")
    # A duplicate is possible only for a message Postfix was told to retry.
    assert {r for r in got_rcpts if got_rcpts.count(r) > 1} <= deferred
    assert collector.held() == []


def test_mail_postfix_delivers_to_node_a_is_listed_on_both_and_fetchmail_collects_it_at_b(
        tmp_path: Path, cluster_nodes: str) -> None:
    a, b = node(tmp_path, "a", cluster_nodes=cluster_nodes), \
        node(tmp_path, "b", cluster_nodes=cluster_nodes)
    with running(a, b), postfix_to(a) as pf:
        bodies = {f"r{n}@{DOMAIN}": f"Subject: m{n}\r\n\r\nvia Postfix to A, number {n}\r\n"
                  for n in range(3)}
        for rcpt, body in bodies.items():
            subprocess.run(["swaks", "--server", f"127.0.0.1:{pf.smtp_port}",
                            "--from", "sender@origin.test", "--to", rcpt,
                            "--data", "-", "--silent", "2"],
                           input=body.replace("\r\n", "\n"), text=True, check=True,
                           capture_output=True, timeout=30)
        wait_for(lambda: pf.queue_size() == 0 and len(a.held(DOMAIN)) == 3, timeout=30,
                 what="Postfix to hand everything to node A")
        logged = delivered_by_postfix(pf)
        assert sorted(logged) == sorted(bodies)
        for n in (a, b):  # either node lists what A took, by the queue IDs Postfix logged
            assert sorted(m["queue_id"] for m in n.held(DOMAIN)) == sorted(logged.values())
            listing = n.cli("queue", "list").stdout
            assert all(qid in listing for qid in logged.values())

        with smtp_sink() as (port, sink):
            result = fetchmail(tmp_path, b.odmr_port, *CUSTOMER, [DOMAIN], port, timeout=30)
            assert result.returncode == 0, result.stdout + result.stderr
        assert sorted(rcpts[0] for _, rcpts, _ in sink.messages) == sorted(bodies)
        for _, rcpts, content in sink.messages:
            assert f"via Postfix to A, number {rcpts[0][1]}".encode() in content
        assert a.held() == [] and b.held() == []


def restart_cluster_node(cluster: RedisCluster, port: int) -> None:
    """Start a killed cluster node again on its own nodes.conf: it rejoins as
    the replica of the master that replaced it."""
    directory = cluster.directory / str(port)
    myself = next(line for line in (directory / "nodes.conf").read_text().splitlines()
                  if "myself" in line.split()[2])
    bus_port = myself.split()[1].split("@")[1].split(",")[0]
    cluster.processes[port] = _redis_process(
        directory, port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        "--cluster-port", bus_port, "--cluster-node-timeout", str(cluster.NODE_TIMEOUT_MS))


def test_killing_the_cluster_master_of_a_busy_domain_during_postfix_intake_loses_nothing(
        tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path / "cluster")
    cluster.start()
    try:
        a, b = node(tmp_path, "a", cluster_nodes=cluster.nodes), \
            node(tmp_path, "b", cluster_nodes=cluster.nodes)

        def kill_the_master_then_bring_it_back_as_a_replica() -> None:
            dead = cluster.kill_master_for(keys.deferred(DOMAIN))
            # Until the dead master is back (as a replica), writes to the domain's
            # slot cannot be confirmed by a replica: 451, Postfix retries.
            restart_cluster_node(cluster, dead)
            wait_for(lambda: _replicas_online(cluster.master_port_for(
                keys.deferred(DOMAIN))) >= 1, timeout=30, interval=0.1,
                what="the old master back as a replica")

        with running(a, b), postfix_to(a) as pf:
            intake_under_failover(pf, kill_the_master_then_bring_it_back_as_a_replica, b)
    finally:
        cluster.stop()


def test_killing_the_sentinels_master_during_postfix_intake_loses_nothing(
        tmp_path: Path) -> None:
    sentinels = RedisSentinelSet(tmp_path / "sentinel")
    sentinels.start()
    try:
        on_sentinels = {"sentinels": sentinels.sentinels,
                        "sentinel_master": sentinels.MASTER_NAME}
        a, b = node(tmp_path, "a", **on_sentinels), node(tmp_path, "b", **on_sentinels)

        def kill_the_master_then_bring_it_back_as_a_replica() -> None:
            old = sentinels.master()
            new = sentinels.kill_master()
            sentinels.processes[old] = _redis_process(
                sentinels.directory / "master", old, "--replicaof", "127.0.0.1", str(new))
            wait_for(lambda: _replicas_online(new) >= 1, timeout=30, interval=0.1,
                     what="the old master back as a replica")

        with running(a, b), postfix_to(a) as pf:
            intake_under_failover(pf, kill_the_master_then_bring_it_back_as_a_replica, a)
    finally:
        sentinels.stop()


def test_a_full_redis_says_452_4_3_1_stores_nothing_by_halves_and_takes_mail_once_collected(
        tmp_path: Path) -> None:
    port = free_port()
    server = _redis_process(tmp_path / "redis", port, "--maxmemory", "3mb",
                            "--maxmemory-policy", "noeviction")
    try:
        wait_for(lambda: _answers(port), what="redis-server")
        n = node(tmp_path, "node", url=f"redis://127.0.0.1:{port}", wait_replicas="0")
        with running(n):
            acknowledged: dict[str, bytes] = {}
            refused: tuple[int, str] | None = None
            for i in range(200):
                body = f"Subject: m{i}\r\n\r\n".encode() + (f"{i:04d}".encode() * 19
                                                            + b"\r\n") * 600  # ~47 KB
                (code, text), = lmtp_send(n.lmtp_port, "s@origin.test", [f"r{i}@{DOMAIN}"],
                                          body)
                if code != 250:
                    refused = (code, text)
                    break
                acknowledged[text.rsplit(" ", 1)[1]] = body
            assert refused is not None, "Redis never filled up"
            assert refused == (452, f"4.3.1 <r{i}@{DOMAIN}> Error: insufficient system "
                                    "storage, try again later")
            assert len(acknowledged) >= 5

            # Nothing by halves: no unfinished pieces, only the acknowledged messages.
            direct = redis.Redis(port=port)
            assert list(direct.scan_iter(match="bridge:*:incoming:*")) == []
            listed = n.held(DOMAIN)
            assert sorted(m["queue_id"] for m in listed) == sorted(acknowledged)

            mta = collect(n)
            got = {OUR_QID.findall(raw)[0].decode(): raw for raw in mta.raw_messages}
            assert sorted(got) == sorted(acknowledged)
            for qid, raw in got.items():
                assert without_our_trace(raw) == acknowledged[qid]  # byte-exact
            assert n.held() == []

            # Room again: intake works again.
            assert lmtp_send(n.lmtp_port, "s@origin.test", [f"later@{DOMAIN}"],
                             b"Subject: later\r\n\r\nroom again\r\n")[0][0] == 250
            assert len(n.held(DOMAIN)) == 1
    finally:
        server.kill()
        server.wait(10)


def test_a_bounce_that_does_not_fit_a_full_redis_leaves_its_message_held_not_the_session(
        tmp_path: Path) -> None:
    port = free_port()
    server = _redis_process(tmp_path / "redis", port, "--maxmemory", "3mb",
                            "--maxmemory-policy", "noeviction")
    try:
        wait_for(lambda: _answers(port), what="redis-server")
        n = node(tmp_path, "node", url=f"redis://127.0.0.1:{port}", wait_replicas="0")
        with running(n):
            rcpts = []
            for i in range(200):
                body = f"Subject: m{i}\r\n\r\n".encode() + (b"x" * 76 + b"\r\n") * 600
                (code, _), = lmtp_send(n.lmtp_port, "s@origin.test", [f"r{i}@{DOMAIN}"], body)
                if code != 250:
                    break
                rcpts.append(f"r{i}@{DOMAIN}")
            refused = rcpts[0]  # its bounce (the whole message) cannot be stored
            mta = collect(n, rcpt_replies={refused: "550 5.1.1 no such user"})
            assert sorted(m[1][0] for m in mta.messages) == sorted(rcpts[1:])
            assert [m["recipients"][0]["address"] for m in n.held(DOMAIN)] == [refused]
            assert n.logged("outcome not recorded, store full")
            # Room now: the next session records the 550 and queues the bounce.
            collect(n, rcpt_replies={refused: "550 5.1.1 no such user"})
            assert n.held(DOMAIN) == []
            assert len(n.held(notices=True)) == 1
    finally:
        server.kill()
        server.wait(10)


@pytest.fixture(autouse=True)
def _timing(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    print(f"{request.node.name}: {time.monotonic() - started:.1f} s")

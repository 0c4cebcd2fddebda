"""Where Redis is: one server, a Redis Cluster, or a master behind Sentinel.

Real redis-server processes throughout (tests.peers.RedisCluster: 3 masters
and 3 replicas; RedisSentinelSet: a master, a replica, three sentinels).
The spool is still each node's own (the ``files`` store) here.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from odmr_bridge import keys, redis_topology
from odmr_bridge.accounts import AccountsFile
from odmr_bridge.anvil import ADMITTED, TOO_MANY_CONNECTIONS, Anvil, AnvilPolicy
from odmr_bridge.config import ConfigError, Settings, build
from odmr_bridge.index import Index
from odmr_bridge.milter import Policy
from odmr_bridge.spool import Envelope, Recipient, new_qid
from odmr_bridge.throttle import AuthThrottle, ThrottlePolicy
from tests import test_queue, test_reindex
from tests.conftest import CUSTOMER
from tests.peers import Bridge, RedisCluster, RedisSentinelSet, free_port, wait_for
from tests.wire import CustomerMta, Wire, lmtp_send


def on_cluster(nodes: str) -> Settings:
    return build({"redis": {"cluster_nodes": nodes}}, {})


def on_sentinels(sentinels: RedisSentinelSet) -> Settings:
    return build({"redis": {"sentinels": sentinels.sentinels,
                            "sentinel_master": sentinels.MASTER_NAME}}, {})


def envelope(domain: str = "atrn.example") -> Envelope:
    return Envelope(qid=new_qid(), domain=domain, sender="s@origin.test",
                    arrival=time.time(), size=100, recipients=[Recipient(f"a@{domain}")])


# -- configuration ----------------------------------------------------------------

def test_exactly_one_place_for_redis_is_named() -> None:
    with pytest.raises(ConfigError,
                       match=re.escape("redis.url and redis.cluster_nodes: set only one")):
        build({"redis": {"url": "redis://127.0.0.1", "cluster_nodes": "127.0.0.1:7000"}}, {})
    with pytest.raises(ConfigError, match=re.escape("redis.sentinels and redis.sentinel_master")):
        build({"redis": {"sentinels": "127.0.0.1:26379"}}, {})
    with pytest.raises(ConfigError, match=re.escape("redis.cluster_nodes: expected host:port")):
        build({"redis": {"cluster_nodes": "127.0.0.1"}}, {})
    settings = build({}, {"ODMR_BRIDGE_REDIS_CLUSTER_NODES": "10.0.0.1:7000, 10.0.0.2:7000"})
    assert redis_topology.describe(settings) == "Redis Cluster at 10.0.0.1:7000,10.0.0.2:7000"


def test_writes_wait_for_one_replica_on_cluster_and_sentinel_none_on_one_server() -> None:
    assert redis_topology.wait_replicas(build({}, {}).redis) == 0
    assert redis_topology.wait_replicas(on_cluster("127.0.0.1:7000").redis) == 1
    assert redis_topology.wait_replicas(build({"redis": {
        "sentinels": "127.0.0.1:26379", "sentinel_master": "m"}}, {}).redis) == 1
    assert redis_topology.wait_replicas(build({"redis": {
        "cluster_nodes": "127.0.0.1:7000", "wait_replicas": 2}}, {}).redis) == 2


# -- unreachable at start ------------------------------------------------------------

def nowhere(tmp_path: Path, **env: str) -> Bridge:
    return Bridge(tmp_path / "bridge", "", extra_env=env)


@pytest.mark.parametrize("command", [["serve"], ["queue", "list"]])
def test_an_unreachable_cluster_at_start_is_one_line_naming_it(tmp_path: Path,
                                                               command: list[str]) -> None:
    nodes = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    result = nowhere(tmp_path, ODMR_BRIDGE_REDIS_CLUSTER_NODES=nodes).cli(*command, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"odmr-bridge: cannot reach Redis Cluster at {nodes}: "), last


def test_unreachable_sentinels_at_start_are_one_line_naming_them(tmp_path: Path) -> None:
    sentinels = f"127.0.0.1:{free_port()}"
    result = nowhere(tmp_path, ODMR_BRIDGE_REDIS_SENTINELS=sentinels,
                     ODMR_BRIDGE_REDIS_SENTINEL_MASTER="bridge").cli("serve", check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"odmr-bridge: cannot reach Redis Sentinel master 'bridge' via {sentinels}: ")


# -- the bridge on a cluster and on sentinels ---------------------------------------

def bridge_on(tmp_path: Path, **env: str) -> Iterator[Bridge]:
    b = Bridge(tmp_path / "bridge", "", extra_env=env)
    AccountsFile(b.accounts).add_domain("atrn.example", [CUSTOMER[0]],
                                        {CUSTOMER[0]: CUSTOMER[1].encode()})
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def cluster_bridge(tmp_path: Path, cluster_nodes: str) -> Iterator[Bridge]:
    yield from bridge_on(tmp_path, ODMR_BRIDGE_REDIS_CLUSTER_NODES=cluster_nodes)


@pytest.fixture
def sentinel_bridge(tmp_path: Path, sentinels: RedisSentinelSet) -> Iterator[Bridge]:
    yield from bridge_on(tmp_path, ODMR_BRIDGE_REDIS_SENTINELS=sentinels.sentinels,
                         ODMR_BRIDGE_REDIS_SENTINEL_MASTER=sentinels.MASTER_NAME)


def scrape(bridge: Bridge) -> str:
    url = f"http://127.0.0.1:{bridge.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def takes_mail_lists_it_and_serves_atrn(bridge: Bridge) -> None:
    body = b"Subject: on many nodes\r\n\r\nhello\r\n"
    for rcpt in ("a@atrn.example", "b@atrn.example"):
        assert lmtp_send(bridge.lmtp_port, "s@origin.test", [rcpt], body)[0][0] == 250
    assert sorted(r["address"] for m in bridge.held("atrn.example")
                  for r in m["recipients"]) == ["a@atrn.example", "b@atrn.example"]
    metrics = scrape(bridge)
    assert "odmr_bridge_redis_up 1.0" in metrics
    assert 'odmr_bridge_held_messages{domain="atrn.example"} 2.0' in metrics

    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    got = CustomerMta(w).run()
    assert sorted(rcpts[0] for _, rcpts, _ in got) == ["a@atrn.example", "b@atrn.example"]
    assert all(content.endswith(b"hello\r\n") for _, _, content in got)
    wait_for(lambda: bridge.held() == [], what="the queue to empty")
    assert bridge.cli("queue", "list").stdout.strip() == "Mail queue is empty"


def test_the_bridge_on_a_redis_cluster_takes_mail_and_serves_atrn(
        cluster_bridge: Bridge) -> None:
    takes_mail_lists_it_and_serves_atrn(cluster_bridge)
    assert cluster_bridge.logged("using Redis Cluster at 127.0.0.1:")


def test_the_bridge_on_redis_sentinel_takes_mail_and_serves_atrn(
        sentinel_bridge: Bridge) -> None:
    takes_mail_lists_it_and_serves_atrn(sentinel_bridge)
    assert sentinel_bridge.logged("using Redis Sentinel master 'bridge' via")


def test_the_milter_reads_the_quota_from_the_cluster(cluster_bridge: Bridge,
                                                     cluster_nodes: str) -> None:
    assert lmtp_send(cluster_bridge.lmtp_port, "s@origin.test", ["a@atrn.example"],
                     b"Subject: x\r\n\r\n" + b"y" * 500 + b"\r\n")[0][0] == 250
    client = redis_topology.sync_client(on_cluster(cluster_nodes))
    policy = Policy(lambda: AccountsFile(cluster_bridge.accounts).read(),
                    lambda: frozenset(), client, "tempfail")
    messages, size = policy.held("atrn.example")
    assert messages == 1 and size > 500
    assert policy.held("empty.example") == (0, 0)


# -- no command spans slots -------------------------------------------------------------

@pytest.fixture
async def index(cluster_nodes: str) -> AsyncIterator[Index]:
    """Overrides conftest's: the queue and index of this module sit on the cluster."""
    client = redis_topology.async_client(on_cluster(cluster_nodes))
    index = Index(client)
    await index.prepare()
    yield index
    await client.aclose()


# The queue-level specifications of test_queue.py and test_reindex.py, again on
# the cluster (a CROSSSLOT error, or a transaction over two slots, fails them).
_QUEUE_LEVEL = {"queue", "index", "spool", "tmp_path"}
for _module in (test_queue, test_reindex):
    for _name, _test in list(vars(_module).items()):
        if _name.startswith("test_") and inspect.iscoroutinefunction(_test) \
                and set(inspect.signature(_test).parameters) <= _QUEUE_LEVEL:
            globals()[f"{_name}__on_a_redis_cluster"] = _test


async def test_every_domain_is_listed_and_its_keys_stay_in_its_slot(index: Index) -> None:
    domains = [f"d{n}.example" for n in range(20)]
    for domain in domains:
        assert await index.add(envelope(domain))
    assert await index.domains() == sorted(domains)
    assert await index.recount(domains[0])
    assert await index.stats(domains[0]) == {"messages": 1, "bytes": 100}
    qids = [(d, (await index.queued_ids(d))[0]) for d in domains]
    await index.remove_many(qids)
    assert [await index.count(d) for d in domains] == [0] * 20


async def test_leases_throttling_and_anvil_work_on_a_cluster(index: Index) -> None:
    node = Index(index.redis, owner="node-a")
    domains = [f"d{n}.example" for n in range(10)]
    token = node.new_token()
    for domain in domains:
        assert await node.acquire(domain, token, 30)
    assert not await index.acquire(domains[0], index.new_token(), 30)
    assert await node.renew(domains[1], token, 30)
    assert await node.release(domains[1], token)
    assert await node.free_own_leases(domains) == [d for d in domains if d != domains[1]]

    throttle = AuthThrottle(index.redis, ThrottlePolicy(max_failures=2))
    await throttle.prepare()
    for _ in range(2):
        await throttle.failed("192.0.2.1", "cust")
    assert await throttle.blocked("192.0.2.1", "someone")
    assert await throttle.blocked("192.0.2.9", "cust")
    assert not await throttle.blocked("192.0.2.9", "someone")

    anvil = Anvil(index.redis, AnvilPolicy(max_connections=1))
    verdict, connection = await anvil.admit("192.0.2.1")
    assert verdict == ADMITTED
    assert (await anvil.admit("192.0.2.1"))[0] == TOO_MANY_CONNECTIONS
    await anvil.release("192.0.2.1", connection)
    assert (await anvil.admit("192.0.2.1"))[0] == ADMITTED


# -- replicas confirm writes; failover keeps them --------------------------------------

async def test_a_write_is_confirmed_by_the_replica_of_the_node_that_took_it(
        index: Index) -> None:
    message = envelope()
    await index.add(message)
    key = keys.message(message.domain, message.qid)
    assert await redis_topology.confirm_replicated(index.redis, key)
    # Each master has one replica: two never confirm.
    assert not await redis_topology.confirm_replicated(index.redis, key, replicas=2,
                                                       timeout=0.2)


async def test_a_confirmed_message_survives_the_kill_of_its_cluster_master(
        tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path / "cluster")
    cluster.start()
    client = redis_topology.async_client(on_cluster(cluster.nodes))
    try:
        index = Index(client)
        await index.prepare()
        message = envelope()
        await index.add(message)
        assert await redis_topology.confirm_replicated(
            client, keys.message(message.domain, message.qid))
        cluster.kill_master_for(keys.deferred(message.domain))
        assert await index.queued_ids(message.domain) == [message.qid]
        assert await index.add(envelope())  # and the promoted replica takes writes
        assert await index.count(message.domain) == 2
    finally:
        await client.aclose()
        cluster.stop()


async def test_a_confirmed_message_survives_the_kill_of_the_sentinels_master(
        tmp_path: Path) -> None:
    sentinels = RedisSentinelSet(tmp_path / "sentinel")
    sentinels.start()
    client = redis_topology.async_client(on_sentinels(sentinels))
    try:
        index = Index(client)
        await index.prepare()
        message = envelope()
        await index.add(message)
        assert await redis_topology.confirm_replicated(
            client, keys.message(message.domain, message.qid))
        sentinels.kill_master()
        # The first command after a failover may fail: its pooled connection was
        # to the dead master (intake says 451 then); the next asks the sentinels.
        with contextlib.suppress(redis.ConnectionError):
            await client.ping()
        assert await index.queued_ids(message.domain) == [message.qid]
        assert await index.add(envelope())
        assert await index.count(message.domain) == 2
    finally:
        await client.aclose()
        sentinels.stop()

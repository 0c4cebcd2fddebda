"""Fixtures: a real redis-server per test session (flushed per test), the bridge, peers."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from odmr_bridge.accounts import AccountsFile
from odmr_bridge.index import Index
from odmr_bridge.queue import HoldQueue
from odmr_bridge.spool import Spool
from tests.peers import Bridge, RedisCluster, RedisSentinelSet, RedisServer

CUSTOMER = ("cust", "s3cret-Pa55")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster (3 masters, 3 replicas) for the session; not for killing
    masters in (use a cluster of the test's own for that)."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_nodes(redis_cluster: RedisCluster) -> str:
    """The session's cluster, emptied: its seed list (redis.cluster_nodes)."""
    redis_cluster.flush()
    return redis_cluster.nodes


@pytest.fixture(scope="session")
def redis_sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelSet]:
    """A master, its replica and three sentinels for the session; not for
    failovers (use a set of the test's own for that)."""
    sentinels = RedisSentinelSet(tmp_path_factory.mktemp("redis-sentinel"))
    try:
        sentinels.start()
        yield sentinels
    finally:
        sentinels.stop()


@pytest.fixture
def sentinels(redis_sentinel_set: RedisSentinelSet) -> RedisSentinelSet:
    """The session's sentinel set, its master emptied."""
    redis_sentinel_set.client().flushall()
    return redis_sentinel_set


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.ensure()
    return s


@pytest.fixture
async def index(redis_url: str) -> AsyncIterator[Index]:
    client = aioredis.from_url(redis_url)
    yield Index(client)
    await client.aclose()


@pytest.fixture
def queue(spool: Spool, index: Index) -> HoldQueue:
    return HoldQueue(spool, index)


@pytest.fixture
def bridge(tmp_path: Path, redis_url: str) -> Iterator[Bridge]:
    """A running bridge; atrn.example and second.example belong to CUSTOMER."""
    b = Bridge(tmp_path / "bridge", redis_url)
    store = AccountsFile(b.accounts)
    store.add_domain("atrn.example", [CUSTOMER[0], "other"],
                     {CUSTOMER[0]: CUSTOMER[1].encode(), "other": b"other-pass"})
    store.add_domain("second.example", [CUSTOMER[0]], {})
    store.add_domain("foreign.example", ["stranger"], {"stranger": b"stranger-pass"})
    b.start()
    yield b
    b.stop()


def need(*programs: str) -> None:
    """Real peers are Debian packages; scripts/test installs them and sets
    ODMR_TESTS_REQUIRE_PEERS=1, so there a missing one fails instead of skipping."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        message = f"not installed: {', '.join(missing)} (scripts/test installs them)"
        if os.environ.get("ODMR_TESTS_REQUIRE_PEERS") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def syslog_socket() -> Iterator[tuple[Path, socket.socket]]:
    """A stand-in for /dev/log: a unix datagram socket, like rsyslog's or journald's."""
    directory = Path(tempfile.mkdtemp(prefix="odmr-log-"))  # short: unix socket paths
    path = directory / "log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield path, sock
    sock.close()
    path.unlink()
    directory.rmdir()

"""Which Redis the bridge talks to, and the clients for it.

``[redis]`` names one of: a single server (``url``; empty: the private
redis-server under the spool directory), a Redis Cluster (``cluster_nodes``)
or a master watched by Redis Sentinel (``sentinels`` + ``sentinel_master``).
:func:`async_client` builds the asyncio client for the daemon and the CLI,
:func:`sync_client` the synchronous one for the milter and the metrics
collector; :func:`connect` is the first contact at start-up, with one
clear line naming what was tried when it fails.

In a cluster every command touches one slot: per-domain keys share the
hash tag ``{domain}`` (keys.py) and every script declares its keys.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.cluster import ClusterNode as SyncClusterNode
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.exceptions import RedisClusterException, RedisError
from redis.sentinel import Sentinel as SyncSentinel

from odmr_bridge.config import RedisSettings, Settings, parse_host_ports
from odmr_bridge.embedded_redis import url_for

# The asyncio client: a single server's (also a Sentinel master's) or a cluster's.
AsyncClient = aioredis.Redis | AsyncRedisCluster
SyncClient = redis.Redis | SyncRedisCluster

CONNECT_TIMEOUT = 5.0
# Replies of a synchronous client (milter, metrics) may take this long.
SYNC_TIMEOUT = 5.0


class RedisUnreachable(Exception):
    """Redis did not answer at start-up; the message names what was tried."""


def url(settings: Settings) -> str:
    """The single server's URL: the configured one, or the private one."""
    return settings.redis.url or url_for(settings.spool.dir)


def describe(settings: Settings) -> str:
    """What the settings point at, for messages: ``Redis Cluster at h:p,h:p``."""
    r = settings.redis
    if r.cluster_nodes:
        return f"Redis Cluster at {_nodes_text(r.cluster_nodes)}"
    if r.sentinels:
        return f"Redis Sentinel master {r.sentinel_master!r} via {_nodes_text(r.sentinels)}"
    return f"Redis at {url(settings)}"


def _nodes_text(value: str) -> str:
    return ",".join(f"{h}:{p}" for h, p in parse_host_ports(value))


def wait_replicas(settings: RedisSettings) -> int:
    """Replicas that must confirm a write: the setting, or 1 in cluster/sentinel mode."""
    if settings.wait_replicas >= 0:
        return settings.wait_replicas
    return 1 if settings.cluster_nodes or settings.sentinels else 0


def _password(settings: RedisSettings) -> str | None:
    return settings.password or None


def async_client(settings: Settings) -> AsyncClient:
    """The asyncio client for the configured Redis (connects on first use)."""
    r = settings.redis
    if r.cluster_nodes:
        return AsyncRedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in parse_host_ports(r.cluster_nodes)],
            password=_password(r), socket_connect_timeout=CONNECT_TIMEOUT)
    if r.sentinels:
        sentinel = AsyncSentinel(  # type: ignore[no-untyped-call]
            parse_host_ports(r.sentinels),
                                 socket_connect_timeout=CONNECT_TIMEOUT,
                                 sentinel_kwargs={"socket_connect_timeout": CONNECT_TIMEOUT,
                                                  "socket_timeout": CONNECT_TIMEOUT})
        master: aioredis.Redis = sentinel.master_for(
            r.sentinel_master, redis_class=aioredis.Redis, password=_password(r))
        return master
    return aioredis.from_url(url(settings), password=_password(r),
                             socket_connect_timeout=CONNECT_TIMEOUT)


def sync_client(settings: Settings) -> SyncClient:
    """The synchronous client (milter threads, the metrics scrape)."""
    r = settings.redis
    timeouts: dict[str, Any] = {"socket_timeout": SYNC_TIMEOUT,
                                "socket_connect_timeout": SYNC_TIMEOUT}
    if r.cluster_nodes:
        return SyncRedisCluster(
            startup_nodes=[SyncClusterNode(h, p)  # type: ignore[no-untyped-call]
                           for h, p in parse_host_ports(r.cluster_nodes)],
            password=_password(r), **timeouts)
    if r.sentinels:
        sentinel = SyncSentinel(  # type: ignore[no-untyped-call]
            parse_host_ports(r.sentinels), sentinel_kwargs=timeouts, **timeouts)
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            r.sentinel_master, password=_password(r))
        return master
    return redis.Redis.from_url(url(settings), password=_password(r), **timeouts)


async def connect(settings: Settings) -> AsyncClient:
    """:func:`async_client`, asked once (PING); RedisUnreachable if it does not answer."""
    client = async_client(settings)
    try:
        await client.ping()
    except (RedisError, RedisClusterException, OSError) as exc:
        await client.aclose()
        reason = str(exc).strip() or type(exc).__name__
        raise RedisUnreachable(f"cannot reach {describe(settings)}: {reason}") from None
    return client


# -- durability ------------------------------------------------------------------

_HASH_TAG = re.compile(r"\{([^}]+)\}")


def _marker(key: str) -> str:
    """A key in *key*'s slot: the WAIT below counts from a write of ours there."""
    tag = _HASH_TAG.search(key)
    return f"bridge:{{{tag.group(1) if tag else key}}}:replicated"


async def confirm_replicated(client: AsyncClient, key: str, replicas: int = 1,
                             timeout: float = 1.0) -> bool:
    """True once *replicas* replicas of the master serving *key* have every
    write made to it so far (so also the caller's, already answered); False
    if fewer confirm within *timeout* seconds, or on any Redis error.

    WAIT counts from the last write of the connection it is sent on, and a
    pool hands out any connection: so one connection writes a marker in
    *key*'s slot (after the caller's write, so at a later replication
    offset) and then WAITs, on the node that serves that slot.
    """
    if replicas <= 0:
        return True
    marker = _marker(key)
    token = secrets.token_hex(8)
    wait_ms = max(1, int(timeout * 1000))
    try:
        if isinstance(client, AsyncRedisCluster):
            node = client.get_node_from_key(marker)
            if node is None:
                return False
            connection = node.acquire_connection()
            try:
                await connection.send_packed_command(connection.pack_commands(
                    [("SET", marker, token, "PX", 60_000), ("WAIT", replicas, wait_ms)]))
                await connection.read_response()
                acknowledged = await connection.read_response()
            except BaseException:
                await connection.disconnect()  # replies may be left unread
                raise
            finally:
                node.release(connection)
        else:
            pipe = client.pipeline(transaction=False)
            pipe.set(marker, token, px=60_000)
            pipe.execute_command("WAIT", replicas, wait_ms)
            _, acknowledged = await pipe.execute()
    except (RedisError, RedisClusterException, OSError):
        return False
    return int(acknowledged) >= replicas

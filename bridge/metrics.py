"""Prometheus metrics (prometheus_client): counters of events, gauges of the hold queue.

Counters live in the process (they restart at zero with it, as Prometheus
expects).  The hold-queue gauges are read from the Redis index at scrape
time by :class:`HoldQueueCollector`, with a synchronous client on the HTTP
server's thread, so they are the same numbers ``redis-cli`` shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from prometheus_client import Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from odmr_bridge import keys
from odmr_bridge.redis_topology import SyncClient
from odmr_bridge.spool import BOUNCE, Spool

INTAKE_MESSAGES = Counter("odmr_bridge_intake_messages",
                          "Messages committed to the hold queue (one per ATRN domain)")
INTAKE_BYTES = Counter("odmr_bridge_intake_bytes", "Bytes committed to the hold queue")
INTAKE_FAILURES = Counter("odmr_bridge_intake_failures",
                          "LMTP transactions answered 4xx because the queue could not "
                          "commit them", ["reason"])
RECIPIENTS = Counter("odmr_bridge_recipients",
                     "Recipient outcomes: sent, deferred, bounced (by the customer's MTA), "
                     "expired", ["status"])
NOTICES = Counter("odmr_bridge_notices",
                  "Notices to senders (failed, delayed, relayed) by what the host MTA did",
                  ["kind", "status"])
ODMR_SESSIONS = Counter("odmr_bridge_odmr_sessions", "ODMR connections accepted")
ODMR_ACTIVE = Gauge("odmr_bridge_odmr_sessions_active", "ODMR connections open now")
ACCEPT_PAUSES = Counter("odmr_bridge_accept_pauses",
                        "accept() failures for want of file descriptors (a pause each)")
ODMR_REFUSED_CONNECTIONS = Counter("odmr_bridge_odmr_connections_refused",
                                   "ODMR connections refused by a per-client limit",
                                   ["limit"])
ATRN = Counter("odmr_bridge_atrn", "ATRN commands by result", ["result"])
AUTH_FAILURES = Counter("odmr_bridge_auth_failures", "Failed AUTH attempts", ["mechanism"])


def _number(value: bytes | str | None) -> float:
    return float(value) if value is not None else 0.0


def notices_in_spool(spool: Spool) -> Callable[[], int]:
    """The files store's notices waiting: its bounce/ directory."""
    return lambda: sum(1 for _ in spool.ids(BOUNCE))


def notices_in_redis(client: SyncClient) -> Callable[[], int]:
    """The redis store's notices waiting: a SCAN over every master (a scrape
    costs a pass over the keyspace; fine for the queue sizes ODMR sees)."""
    return lambda: sum(1 for _ in client.scan_iter(match=keys.stored_pattern(BOUNCE),
                                                   count=1000))


class HoldQueueCollector(Collector):
    """Per-domain gauges from the Redis index, and the notices waiting (from
    the store), read at each scrape."""

    def __init__(self, client: SyncClient, notices: Callable[[], int]) -> None:
        self.redis = client
        self.notices = notices

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily("odmr_bridge_notices_waiting",
                                    "Notices to senders not yet accepted by the host MTA")
        try:
            waiting.add_metric([], self.notices())
            yield waiting
        except redis.RedisError:
            pass  # redis_up says why
        up = GaugeMetricFamily("odmr_bridge_redis_up",
                               "1 when the Redis index answered this scrape")
        try:
            rows = self._read()
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        labels = ["domain"]
        held = GaugeMetricFamily("odmr_bridge_held_messages",
                                 "Messages held for the domain (on hold included)", labels=labels)
        size = GaugeMetricFamily("odmr_bridge_held_bytes", "Bytes held for the domain",
                                 labels=labels)
        on_hold = GaugeMetricFamily("odmr_bridge_on_hold_messages",
                                    "Messages the operator put on hold", labels=labels)
        oldest = GaugeMetricFamily("odmr_bridge_oldest_message_age_seconds",
                                   "Age of the domain's oldest held message", labels=labels)
        now = time.time()
        for domain, stats, first, on_hold_count in rows:
            held.add_metric([domain], _number(stats.get(b"messages")))
            size.add_metric([domain], _number(stats.get(b"bytes")))
            on_hold.add_metric([domain], on_hold_count)
            oldest.add_metric([domain], max(0.0, now - first) if first else 0.0)
        yield from (held, size, on_hold, oldest)

    def _read(self) -> list[tuple[str, dict[bytes, Any], float | None, int]]:
        domains = sorted(d.decode() if isinstance(d, bytes) else d
                         for d in self.redis.smembers(keys.DOMAINS))
        pipe = self.redis.pipeline(transaction=False)
        for domain in domains:
            pipe.hgetall(keys.stats(domain))
            pipe.zrange(keys.deferred(domain), 0, 0, withscores=True)
            pipe.zrange(keys.hold(domain), 0, 0, withscores=True)
            pipe.zcard(keys.hold(domain))
        answers = pipe.execute()
        rows = []
        for i, domain in enumerate(domains):
            stats, first_deferred, first_held, held_count = answers[4 * i:4 * i + 4]
            firsts = [score for _, score in first_deferred + first_held]
            rows.append((domain, stats, min(firsts) if firsts else None, int(held_count)))
        return rows


def serve(listen: tuple[str, int], client: SyncClient, notices: Callable[[], int],
          registry: CollectorRegistry = REGISTRY) -> Any:
    """Start the /metrics HTTP endpoint on its own thread; returns the server (shutdown()).
    *client*: redis_topology.sync_client (a scrape runs on the server's thread);
    *notices*: how many notices wait (notices_in_spool / notices_in_redis)."""
    registry.register(HoldQueueCollector(client, notices))
    server, _thread = start_http_server(listen[1], listen[0], registry=registry)
    return server

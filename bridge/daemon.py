"""``odmr-bridge serve``: LMTP intake and the ODMR listener in one asyncio process.

Start-up: spool directories, Redis (a private one when none is configured),
the accounts file (reloaded on change), the leases of this node's previous
run freed, a reindex from the spool, then both listeners.  SIGTERM/SIGINT:
stop accepting, let sessions finish for up to ``odmr.shutdown_grace``
seconds, close the rest, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import signal
import socket
import weakref
from collections.abc import Callable
from pathlib import Path
from ssl import SSLContext
from typing import Any

from aiosmtpd.smtp import SMTP

from odmr_bridge import metrics, queue_setup, redis_topology, systemd
from odmr_bridge.accounts import Accounts
from odmr_bridge.anvil import AdmissionGate, Anvil, AnvilPolicy
from odmr_bridge.bounce import ReportSettings
from odmr_bridge.config import Settings, SystemdSocket, parse_host_port, parse_listen
from odmr_bridge.embedded_redis import EmbeddedRedis
from odmr_bridge.leases import NodeIdentity
from odmr_bridge.lifecycle import Lifecycle, LifecyclePolicy
from odmr_bridge.lmtp import IntakeHandler, IntakeServer
from odmr_bridge.logs import Occasional
from odmr_bridge.odmr import OdmrContext, OdmrServer
from odmr_bridge.queue import HoldQueue
from odmr_bridge.relay import Timeouts
from odmr_bridge.spool import Spool
from odmr_bridge.throttle import AuthThrottle, ThrottlePolicy
from odmr_bridge.tls import CertificateReloader, server_context
from odmr_bridge.transport_map import watched_atrn_domains
from odmr_bridge.watch import Reloading

log = logging.getLogger("odmr_bridge.daemon")


def lifecycle_policy(settings: Settings, reporting_mta: str) -> LifecyclePolicy:
    return LifecyclePolicy(
        max_hold=settings.queue.max_hold, delay_warning=settings.queue.delay_warning,
        interval=settings.queue.sweep_interval, relay=parse_host_port(settings.bounce.relay),
        report=ReportSettings(reporting_mta=reporting_mta,
                              max_hold=settings.queue.max_hold,
                              size_limit=settings.bounce.size_limit))


def hostname(settings: Settings) -> str:
    return settings.odmr.hostname or socket.getfqdn()


async def listen(factory: Callable[[], asyncio.BaseProtocol], where: str,
                 ssl: SSLContext | None = None) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    target = parse_listen(where)
    if isinstance(target, SystemdSocket):
        return await loop.create_server(factory, sock=systemd.take(target.name), ssl=ssl,
                                        backlog=1024)
    if isinstance(target, str):
        Path(target).unlink(missing_ok=True)
        return await loop.create_unix_server(factory, target, ssl=ssl)
    host, port = target
    return await loop.create_server(factory, host, port, reuse_address=True, ssl=ssl,
                                    backlog=1024)


# accept() failing for want of descriptors: asyncio stops accepting on that
# socket for a second and retries; say so once a minute, without a traceback.
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    occasionally = Occasional()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_DESCRIPTORS \
                and "accept" in str(context.get("message", "")):
            metrics.ACCEPT_PAUSES.inc()
            if occasionally():
                log.warning("warning: accept: %s; not accepting new connections for a "
                            "moment (raise LimitNOFILE?)", exc.strerror)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def raise_descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE up to the hard one (systemd's LimitNOFILE sets both)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


def _abort(transport: asyncio.BaseTransport) -> None:
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()
    else:
        transport.close()


def _busy(protocol: SMTP) -> bool:
    if isinstance(protocol, IntakeServer):
        return protocol.envelope is not None and bool(protocol.envelope.mail_from)
    if isinstance(protocol, OdmrServer):
        return protocol.delivering
    return True


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self.sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self.servers: list[asyncio.Server] = []

    def _track(self, protocol: SMTP) -> SMTP:
        """A session the shutdown waits for (or cuts short)."""
        self.sessions.add(protocol)
        return protocol

    def _tracked(self, make: Callable[[], SMTP]) -> Callable[[], SMTP]:
        return lambda: self._track(make())

    def _gated(self, anvil: Anvil,
               make: Callable[[Callable[[], None]], SMTP]) -> Callable[[], AdmissionGate]:
        """Port 366: each connection passes the per-client limits first."""
        return lambda: AdmissionGate(anvil, lambda release: self._track(make(release)))

    async def run(self) -> int:
        settings = self.settings
        quiet_accept_errors(asyncio.get_running_loop())
        log.info("file descriptors: %d", raise_descriptor_limit())
        spool = Spool(settings.spool.dir)
        spool.ensure()
        if removed := spool.clear_incoming():
            log.info("removed %d unfinished file(s) from incoming/", removed)
        embedded: EmbeddedRedis | None = None
        redis = settings.redis
        if not (redis.url or redis.cluster_nodes or redis.sentinels):
            embedded = EmbeddedRedis(settings.spool.dir, redis.server_binary)
            await asyncio.to_thread(embedded.start)
            log.info("started private redis-server at %s", embedded.socket)
        try:
            client = await redis_topology.connect(settings)
        except redis_topology.RedisUnreachable:
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
            raise
        log.info("using %s", redis_topology.describe(settings))
        node = NodeIdentity.take(spool.root)
        accounts: Reloading[Accounts] | None = None
        transport_domains: Reloading[frozenset[str]] | None = None
        try:
            if settings.store.kind == "files":
                await queue_setup.claim_for_files(client, spool, node)
            queue = await queue_setup.open_queue(settings, client, spool, owner=node.name)
            await queue.prepare()
            accounts = Reloading(settings.accounts.file, Accounts.load)
            accounts.start()
            transport_domains = watched_atrn_domains(settings)
            # This node's sessions died with its last run: free their domains now,
            # not when their leases expire (lease_seconds), before reindex takes them.
            known = set(await queue.domains()) | set(accounts().domains) \
                | transport_domains()
            if freed := await queue.free_own_leases(sorted(known)):
                log.info("freed %d lease(s) of this node's previous run: %s", len(freed),
                         ",".join(freed))
            report = await queue.reindex()  # (a redis store indexes as it writes)
            log.info("index mended from spool: %d message(s) in %d domain(s), %d added, "
                     "%d stale removed, %d corrupt", report.messages, report.domains,
                     report.added, report.removed, report.corrupt)
            await self._serve(queue, client, spool, accounts, transport_domains)
        finally:
            for watched in (accounts, transport_domains):
                if watched is not None:
                    watched.stop()
            await client.aclose()
            node.release()
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
        log.info("stopped")
        return 0

    async def _serve(self, queue: HoldQueue, client: Any, spool: Spool,
                     accounts: Reloading[Accounts],
                     transport_domains: Reloading[frozenset[str]]) -> None:
        settings = self.settings
        name = hostname(settings)

        def atrn_domains() -> Callable[[str], bool]:
            """The ATRN domains as of now (a snapshot for one connection)."""
            in_map, in_file = transport_domains(), accounts()
            return lambda domain: domain in in_map or in_file.is_atrn_domain(domain)

        intake = IntakeHandler(queue, atrn_domains)
        lifecycle = Lifecycle(queue, lifecycle_policy(settings, name))
        tls_context = server_context(settings.tls)
        throttle = AuthThrottle(client, ThrottlePolicy(
            settings.auth.max_failures, settings.auth.failure_window, settings.auth.failure_delay))
        await throttle.prepare()
        anvil = Anvil(client, AnvilPolicy(
            max_connections=settings.odmr.client_connection_limit,
            max_rate=settings.odmr.client_connection_rate_limit))
        anvil_renewal = asyncio.create_task(anvil.renew_forever())
        odmr = OdmrContext(
            queue=queue, accounts=accounts, hostname=name, throttle=throttle,
            lease_seconds=settings.odmr.lease_seconds,
            command_timeout=settings.odmr.command_timeout,
            timeouts=Timeouts(greeting=settings.odmr.reply_timeout,
                              command=settings.odmr.reply_timeout,
                              data_start=settings.odmr.reply_timeout,
                              data_end=settings.odmr.data_timeout),
            tls_context=tls_context, require_tls=settings.tls.require_tls,
            max_bad_commands=settings.odmr.max_bad_commands,
            after_drain=lifecycle.kick,
        )
        # Metrics first: once the mail ports answer, so does /metrics.
        metrics_server = None
        if settings.metrics.listen:
            scraper = redis_topology.sync_client(settings)
            notices = (metrics.notices_in_redis(scraper) if settings.store.kind == "redis"
                       else metrics.notices_in_spool(spool))
            metrics_server = metrics.serve(parse_host_port(settings.metrics.listen), scraper,
                                           notices)
        self.servers = [
            await listen(self._tracked(lambda: IntakeServer(
                intake, hostname=name, data_size_limit=settings.lmtp.max_message_size,
                timeout=settings.lmtp.timeout)), settings.lmtp.listen),
            await listen(self._gated(anvil, lambda release: OdmrServer(odmr, on_close=release)),
                         settings.odmr.listen),
        ]
        if settings.odmr.tls_listen:
            self.servers.append(await listen(
                self._gated(anvil, lambda release: OdmrServer(odmr, tls_on_connect=True,
                                                              on_close=release)),
                settings.odmr.tls_listen, ssl=tls_context))
        certificates = CertificateReloader(tls_context, settings.tls) if tls_context else None
        if certificates is not None:
            certificates.start()
        queue_manager = asyncio.create_task(lifecycle.run(self.stopping))
        log.info("listening: lmtp %s, odmr %s%s%s", settings.lmtp.listen, settings.odmr.listen,
                 f", odmr+tls {settings.odmr.tls_listen}" if settings.odmr.tls_listen else "",
                 f", metrics {settings.metrics.listen}" if settings.metrics.listen else "")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.stopping.wait()
        if certificates is not None:
            certificates.stop()
        await self._shutdown()
        # A pass in progress finishes its step; one stuck on the host MTA is cut
        # short (safe at any point: a notice is removed only once accepted).
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(queue_manager, self.settings.odmr.shutdown_grace)
        anvil_renewal.cancel()
        if metrics_server is not None:
            metrics_server.shutdown()

    async def _shutdown(self) -> None:
        log.info("shutting down: no new connections; waiting up to %.0fs for sessions",
                 self.settings.odmr.shutdown_grace)
        for server in self.servers:
            server.close()
        deadline = asyncio.get_running_loop().time() + self.settings.odmr.shutdown_grace
        while True:
            # Only work in flight earns the grace period (an intake connection
            # inside a transaction, an ODMR session serving ATRN); a session is
            # closed as soon as it is idle.  abort(): a TLS close would wait
            # (up to 30 s) for the peer's close_notify.
            expired = asyncio.get_running_loop().time() > deadline
            open_sessions = [(p, p.transport) for p in self.sessions if p.transport is not None]
            for protocol, transport in open_sessions:
                if transport is not None and (expired or not _busy(protocol)):
                    _abort(transport)
            if not open_sessions or expired:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0)  # let connection_lost callbacks run
        for server in self.servers:
            await server.wait_closed()

"""``odmr-bridge serve``: LMTP intake and the ODMR listener in one asyncio process.

Start-up: spool directories, Redis (a private one when none is configured),
a full reindex from the spool, the accounts file (reloaded on change), then
both listeners.  SIGTERM/SIGINT: stop accepting, let sessions finish for up
to ``odmr.shutdown_grace`` seconds, close the rest, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import weakref
from collections.abc import Callable
from pathlib import Path
from ssl import SSLContext

import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP

from bridge.accounts import Accounts
from bridge.config import Settings, parse_listen
from bridge.embedded_redis import EmbeddedRedis, url_for
from bridge.index import Index
from bridge.lmtp import IntakeHandler, IntakeServer
from bridge.odmr import OdmrContext, OdmrServer
from bridge.queue import HoldQueue
from bridge.relay import Timeouts
from bridge.spool import Spool
from bridge.throttle import AuthThrottle, ThrottlePolicy
from bridge.tls import CertificateReloader, server_context
from bridge.watch import Reloading

log = logging.getLogger("bridge.daemon")


def redis_client(settings: Settings) -> aioredis.Redis:
    """The configured Redis, or the private one under the spool directory."""
    return aioredis.from_url(settings.redis.url or url_for(settings.spool.dir))


def hostname(settings: Settings) -> str:
    return settings.odmr.hostname or socket.getfqdn()


async def listen(factory: Callable[[], SMTP], where: str,
                 ssl: SSLContext | None = None) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    target = parse_listen(where)
    if isinstance(target, str):
        Path(target).unlink(missing_ok=True)
        return await loop.create_unix_server(factory, target, ssl=ssl)
    host, port = target
    return await loop.create_server(factory, host, port, reuse_address=True, ssl=ssl,
                                    backlog=1024)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self.sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self.servers: list[asyncio.Server] = []

    def _tracked(self, make: Callable[[], SMTP]) -> Callable[[], SMTP]:
        def factory() -> SMTP:
            protocol = make()
            self.sessions.add(protocol)
            return protocol
        return factory

    async def run(self) -> int:
        settings = self.settings
        spool = Spool(settings.spool.dir)
        spool.ensure()
        if removed := spool.clear_incoming():
            log.info("removed %d unfinished file(s) from incoming/", removed)
        embedded: EmbeddedRedis | None = None
        if not settings.redis.url:
            embedded = EmbeddedRedis(settings.spool.dir, settings.redis.server_binary)
            await asyncio.to_thread(embedded.start)
            log.info("started private redis-server at %s", embedded.socket)
        client = redis_client(settings)
        accounts: Reloading[Accounts] | None = None
        try:
            queue = HoldQueue(spool, Index(client))
            report = await queue.reindex()
            log.info("index rebuilt from spool: %d message(s) in %d domain(s), %d corrupt",
                     report.messages, report.domains, report.corrupt)
            accounts = Reloading(settings.accounts.file, Accounts.load)
            accounts.start()
            await self._serve(queue, accounts)
        finally:
            if accounts is not None:
                accounts.stop()
            await client.aclose()
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
        log.info("stopped")
        return 0

    async def _serve(self, queue: HoldQueue, accounts: Reloading[Accounts]) -> None:
        settings = self.settings
        name = hostname(settings)
        intake = IntakeHandler(queue, accounts)
        tls_context = server_context(settings.tls)
        odmr = OdmrContext(
            queue=queue, accounts=accounts, hostname=name,
            throttle=AuthThrottle(queue.index.redis, ThrottlePolicy(
                settings.auth.max_failures, settings.auth.failure_window,
                settings.auth.failure_delay)),
            lease_seconds=settings.odmr.lease_seconds,
            command_timeout=settings.odmr.command_timeout,
            timeouts=Timeouts(greeting=settings.odmr.reply_timeout,
                              command=settings.odmr.reply_timeout,
                              data_start=settings.odmr.reply_timeout,
                              data_end=settings.odmr.data_timeout),
            tls_context=tls_context, require_tls=settings.tls.require_tls,
            max_bad_commands=settings.odmr.max_bad_commands,
        )
        self.servers = [
            await listen(self._tracked(lambda: IntakeServer(
                intake, hostname=name, data_size_limit=settings.lmtp.max_message_size,
                timeout=settings.lmtp.timeout)), settings.lmtp.listen),
            await listen(self._tracked(lambda: OdmrServer(odmr)), settings.odmr.listen),
        ]
        if settings.odmr.tls_listen:
            self.servers.append(await listen(
                self._tracked(lambda: OdmrServer(odmr, tls_on_connect=True)),
                settings.odmr.tls_listen, ssl=tls_context))
        certificates = CertificateReloader(tls_context, settings.tls) if tls_context else None
        if certificates is not None:
            certificates.start()
        log.info("listening: lmtp %s, odmr %s%s", settings.lmtp.listen, settings.odmr.listen,
                 f", odmr+tls {settings.odmr.tls_listen}" if settings.odmr.tls_listen else "")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.stopping.wait()
        if certificates is not None:
            certificates.stop()
        await self._shutdown()

    async def _shutdown(self) -> None:
        log.info("shutting down: no new connections; waiting up to %.0fs for sessions",
                 self.settings.odmr.shutdown_grace)
        for server in self.servers:
            server.close()
        for protocol in list(self.sessions):
            # An intake connection between transactions holds nothing: close it now.
            envelope = protocol.envelope
            if isinstance(protocol, IntakeServer) and envelope is not None \
                    and not envelope.mail_from and protocol.transport is not None:
                protocol.transport.close()
        deadline = asyncio.get_running_loop().time() + self.settings.odmr.shutdown_grace
        while any(p.transport is not None for p in self.sessions):
            if asyncio.get_running_loop().time() > deadline:
                for protocol in list(self.sessions):
                    if protocol.transport is not None:
                        protocol.transport.close()
                await asyncio.sleep(0.1)
                break
            await asyncio.sleep(0.05)
        for server in self.servers:
            await server.wait_closed()

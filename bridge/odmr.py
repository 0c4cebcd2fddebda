"""The ODMR provider on port 366 (RFC 2645): EHLO, STARTTLS, AUTH, ATRN, then reversal.

A small subclass of aiosmtpd's SMTP: it adds ``smtp_ATRN`` (and, through
:class:`odmr_bridge.odmr_auth.SaslMixin`, the AUTH mechanisms) and refuses the
mail-transaction verbs.  After ``250`` the same connection, TLS included,
is handed to :class:`odmr_bridge.relay.Relay`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import Session

from odmr_bridge import metrics, replies, smtpd_internals
from odmr_bridge.accounts import Accounts, AccountsError, normalize_domain
from odmr_bridge.leases import LeaseKeeper
from odmr_bridge.odmr_auth import SaslMixin
from odmr_bridge.queue import HoldQueue
from odmr_bridge.relay import Relay, Timeouts
from odmr_bridge.smtp_client import ProtocolError, is_enhanced_code
from odmr_bridge.throttle import AuthThrottle

log = logging.getLogger("odmr_bridge.odmr")


@dataclasses.dataclass(frozen=True)
class OdmrContext:
    """What every ODMR connection shares; the accounts getter returns a snapshot."""

    queue: HoldQueue
    accounts: Callable[[], Accounts]
    throttle: AuthThrottle
    hostname: str
    lease_seconds: float
    command_timeout: float
    timeouts: Timeouts
    tls_context: ssl.SSLContext | None = None
    require_tls: bool = False
    max_bad_commands: int = 10
    # Called after a session that bounced something (the queue manager's kick).
    after_drain: Callable[[], None] = lambda: None


class _NoHooks:
    """aiosmtpd wants a handler object; every ODMR verb is implemented on the server."""


def parse_atrn_argument(arg: str | None) -> list[str] | None:
    """``a.example, b.example`` -> normalised domains; None for no argument.

    Raises AccountsError for an empty or malformed element.
    """
    if arg is None or not arg.strip():
        return None
    domains: list[str] = []
    for part in arg.split(","):
        domain = normalize_domain(part)
        if domain not in domains:
            domains.append(domain)
    return domains


# aiosmtpd's own replies, given enhanced status codes (RFC 3463) on the way out.
_ENHANCED_DEFAULTS = {"221": "2.0.0", "250": "2.0.0", "500": "5.5.2", "501": "5.5.4",
                      "502": "5.5.1", "503": "5.5.1", "504": "5.5.4"}


def with_enhanced_code(reply: str) -> str:
    """``500 Command line too long`` -> ``500 5.5.6 Error: command line too long``."""
    code, sep, text = reply[:3], reply[3:4], reply[4:]
    if code == "500" and smtpd_internals.LINE_TOO_LONG_TEXT in text.lower():
        return replies.LINE_TOO_LONG
    if code == "500" and smtpd_internals.UNRECOGNIZED_TEXT in text:
        return replies.UNRECOGNIZED
    default = _ENHANCED_DEFAULTS.get(code)
    if default is None or is_enhanced_code(text.split(" ", 1)[0]):
        return reply
    return f"{code}{sep or ' '}{default} {text}".rstrip()


class OdmrServer(SaslMixin):
    """One instance per customer connection."""

    def __init__(self, context: OdmrContext, *, tls_on_connect: bool = False,
                 on_close: Callable[[], None] = lambda: None, **kwargs: Any) -> None:
        # One limit on bad commands: ours (odmr.max_bad_commands).
        smtpd_internals.disable_unrecognized_command_limit()
        # Set before aiosmtpd's __init__, which inspects every attribute.
        self.context = context
        self.tls_on_connect = tls_on_connect
        self.on_close = on_close  # frees the client's connection slot (anvil)
        # A session keeps the customers and domains it started with.
        snapshot = context.accounts()
        self.accounts = lambda: snapshot
        self.throttle = context.throttle
        self.require_tls = context.require_tls
        self.user = None
        self._errors = 0
        self._atrn_task: asyncio.Task[None] | None = None
        # For the session's last log line.
        self._collected: list[str] = []
        self._relay: Relay | None = None
        self._tls = "none"
        super().__init__(
            _NoHooks(),
            hostname=context.hostname,
            data_size_limit=None,
            auth_require_tls=False,
            timeout=context.command_timeout,
            tls_context=None if tls_on_connect else context.tls_context,
            ident="ODMR service ready",
            **kwargs,
        )

    # -- connection ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again, with the TLS transport, once a STARTTLS handshake is done.
        starttls = self.transport is not None
        if not starttls:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            metrics.ODMR_SESSIONS.inc()
            metrics.ODMR_ACTIVE.inc()
        super().connection_made(transport)
        if not starttls:
            log.info("connect from %s", self.client)
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:
            self._tls = tls.version() or "TLS"
            cipher, _, bits = tls.cipher() or ("unknown", "", 0)
            log.info("Anonymous TLS connection established from %s: %s with cipher %s "
                     "(%s/%s bits)", self.client, self._tls, cipher, bits, bits)

    def connection_lost(self, error: Exception | None) -> None:
        metrics.ODMR_ACTIVE.dec()
        self.on_close()
        client = self.client
        super().connection_lost(error)
        if self._atrn_task is not None and not self._atrn_task.done():
            # Outcomes still being settled: the counts are final when it ends.
            self._atrn_task.add_done_callback(lambda _: self._log_disconnect(client))
        else:
            self._log_disconnect(client)

    def _log_disconnect(self, client: str) -> None:
        """One line per session, whatever its end (Postfix's "disconnect from")."""
        report = self._relay.report if self._relay is not None else None
        counts = (f" delivered={report.delivered} deferred={report.deferred} "
                  f"failed={report.failed}" if report is not None else "")
        log.info("disconnect from %s user=%s atrn=%s%s tls=%s", client, self.user or "-",
                 ",".join(self._collected) or "-", counts, self._tls)

    def _session(self) -> Session:
        assert self.session is not None, "aiosmtpd creates it at connection_made"
        return self.session

    @property
    def secure(self) -> bool:
        return self.tls_on_connect or smtpd_internals.started_tls(self)

    @property
    def delivering(self) -> bool:
        """An ATRN is being served (leases held, maybe reversed)."""
        return self._atrn_task is not None and not self._atrn_task.done()

    def _peer(self) -> object:
        session: Session | None = getattr(self, "session", None)
        return session.peer if session is not None else None

    @property
    def client_address(self) -> str:
        peer = self._peer()
        return str(peer[0]) if isinstance(peer, tuple) else "unix"

    @property
    def client(self) -> str:
        peer = self._peer()
        if isinstance(peer, tuple):
            return f"[{peer[0]}]:{peer[1]}"
        return "[unix]"

    async def push(self, status: Any) -> None:
        """Every reply before the reversal passes here: enhanced codes, error cap."""
        if isinstance(status, str):
            status = with_enhanced_code(status)
            if status[:1] == "5":
                self._errors += 1
        await super().push(status)
        if self._errors >= self.context.max_bad_commands and self.transport is not None:
            log.warning("%s: too many errors (%d); disconnecting", self.client, self._errors)
            self._errors = -(10**9)  # say it once
            await super().push(replies.TOO_MANY_ERRORS)
            self._close()

    # -- verbs -----------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        smtpd_internals.reset_transaction(self)
        session = self._session()
        session.extended_smtp = True
        session.host_name = hostname
        lines = [self.hostname]
        if self.tls_context is not None and not self.secure:
            lines.append("STARTTLS")
        lines += [f"AUTH {' '.join(self.mechanisms())}", "ATRN", "ENHANCEDSTATUSCODES"]
        # Straight to aiosmtpd's push: EHLO lines carry keywords, not status codes.
        for line in lines[:-1]:
            await super().push(f"250-{line}")
        await super().push(f"250 {lines[-1]}")

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.secure:
            await self.push(replies.TLS_ALREADY)
            return
        await super().smtp_STARTTLS(arg)

    async def _refuse_before_atrn(self, arg: str) -> None:
        await self.push(replies.ODMR_COMMAND_REFUSED)

    # RFC 2645: before the reversal only EHLO, AUTH, ATRN, QUIT (and RSET, NOOP).
    smtp_HELO = smtp_MAIL = smtp_RCPT = smtp_DATA = _refuse_before_atrn
    smtp_VRFY = smtp_EXPN = smtp_HELP = _refuse_before_atrn

    async def smtp_ATRN(self, arg: str | None) -> None:
        session = self._session()
        if not session.host_name:
            await self.push(replies.EHLO_FIRST)
            return
        if self.require_tls and not self.secure:
            await self.push(replies.TLS_REQUIRED)
            return
        if not session.authenticated or self.user is None:
            await self.push(replies.AUTH_REQUIRED)
            return
        accounts = self.accounts()
        try:
            asked = parse_atrn_argument(arg)
        except AccountsError:
            await self.push(replies.ATRN_BAD_DOMAIN)
            return
        domains = accounts.domains_for(self.user) if asked is None else asked
        refused = [d for d in domains if not accounts.may_collect(self.user, d)]
        if not domains or refused:
            log.warning("%s: ATRN refused: user=%s domains=%s", self.client, self.user,
                        ",".join(refused) or "(none)")
            metrics.ATRN.labels("refused").inc()
            await self.push(replies.ATRN_REFUSED)
            return
        # aiosmtpd cancels the command coroutine as soon as the peer closes;
        # the ATRN work (settling outcomes, releasing leases) must finish
        # anyway, so it runs as its own task that the cancellation cannot reach.
        self._atrn_task = asyncio.create_task(self._atrn(domains))
        await asyncio.shield(self._atrn_task)

    async def _atrn(self, domains: list[str]) -> None:
        queue = self.context.queue
        leases = queue.leases(self.context.lease_seconds)
        reversing = False
        try:
            if not await leases.acquire(domains):
                log.info("%s: ATRN %s: busy (another session collects)", self.client,
                         ",".join(domains))
                metrics.ATRN.labels("busy").inc()
                await self.push(replies.ATRN_BUSY)
                return
            counts = [await queue.count(d) for d in domains]
            if not any(counts):
                log.info("%s: ATRN user=%s domains=%s: no mail (453)", self.client, self.user,
                         ",".join(domains))
                metrics.ATRN.labels("no_mail").inc()
                await self.push(replies.ATRN_NO_MAIL)
                return
            log.info("%s: ATRN user=%s domains=%s held=%d: reversing", self.client,
                     self.user, ",".join(domains), sum(counts))
            reversing = True
            self._collected = domains
            metrics.ATRN.labels("reversed").inc()
            await self.push(replies.ATRN_REVERSING)
            await self._reverse(domains, leases)
        except Exception as exc:  # Redis down and the like: nothing moved
            log.error("%s: ATRN failed: %s: %s", self.client, type(exc).__name__, exc)
            if not reversing:
                await self.push(replies.ATRN_BUSY)
            else:
                self._close()
        finally:
            await leases.release()

    async def _reverse(self, domains: list[str], leases: LeaseKeeper) -> None:
        # From here on the relay owns the connection and its own RFC 5321
        # timeouts; aiosmtpd's idle timer must not cut a long delivery.
        smtpd_internals.stop_idle_timer(self)
        self._relay = relay = Relay(*smtpd_internals.streams(self), self.context.queue,
                                    hostname=self.hostname, peer=f"customer{self.client}",
                                    timeouts=self.context.timeouts,
                                    keep_going=lambda: not leases.lost,
                                    line_per_write=self.secure,
                                    before_quit=lambda: self._free(leases))
        try:
            try:
                report = await relay.drain(domains)
            finally:
                await self.context.queue.sync()
            if report.failed:
                self.context.after_drain()  # the bounces go out now, not at the next pass
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError,
                ProtocolError) as exc:
            log.warning("%s: lost connection after ATRN: %s; undelivered mail stays held",
                        self.client, exc or type(exc).__name__)
        self._close()

    async def _free(self, leases: LeaseKeeper) -> None:
        """After the last settle, right before QUIT: the customer may send ATRN
        again as soon as it has answered QUIT, so its domains are free by then."""
        await self.context.queue.sync()
        await leases.release()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

"""The ODMR provider on port 366 (RFC 2645): EHLO, AUTH, ATRN, then reversal.

A small subclass of aiosmtpd's SMTP: it adds ``smtp_ATRN`` and
``auth_CRAM__MD5`` and refuses the mail-transaction verbs.  After ``250``
the same connection is handed to :class:`bridge.relay.Relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Session

from bridge import cram, replies
from bridge.accounts import Accounts, AccountsError, normalize_domain
from bridge.index import Index
from bridge.queue import HoldQueue
from bridge.relay import Relay, Timeouts
from bridge.smtp_client import ProtocolError

log = logging.getLogger("bridge.odmr")


@dataclasses.dataclass(frozen=True)
class OdmrContext:
    """What every ODMR connection shares; the accounts getter returns a snapshot."""

    queue: HoldQueue
    accounts: Callable[[], Accounts]
    hostname: str
    lease_seconds: float
    command_timeout: float
    timeouts: Timeouts


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


class LeaseKeeper:
    """Holds one ATRN lease per domain and renews them while the session runs."""

    def __init__(self, index: Index, ttl: float) -> None:
        self.index = index
        self.ttl = ttl
        self.token = index.new_token()
        self.domains: list[str] = []
        self.lost = False
        self._task: asyncio.Task[None] | None = None

    async def acquire(self, domains: list[str]) -> bool:
        for domain in domains:
            if not await self.index.acquire(domain, self.token, self.ttl):
                await self.release()
                return False
            self.domains.append(domain)
        self._task = asyncio.create_task(self._renew())
        return True

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            for domain in self.domains:
                if not await self.index.renew(domain, self.token, self.ttl):
                    log.warning("lease on %s lost; stopping delivery", domain)
                    self.lost = True
                    return

    async def release(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for domain in self.domains:
            with contextlib.suppress(Exception):
                await self.index.release(domain, self.token)
        self.domains = []


class OdmrServer(SMTP):
    """One instance per customer connection."""

    def __init__(self, context: OdmrContext, **kwargs: Any) -> None:
        super().__init__(
            _NoHooks(),
            hostname=context.hostname,
            data_size_limit=None,
            auth_require_tls=False,
            auth_exclude_mechanism=["PLAIN", "LOGIN"],
            timeout=context.command_timeout,
            **kwargs,
        )
        self.context = context
        self.__ident__ = "ODMR service ready"
        self.user: str | None = None
        self._atrn_task: asyncio.Task[None] | None = None

    # -- connection ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)

    def _session(self) -> Session:
        assert self.session is not None, "aiosmtpd creates it at connection_made"
        return self.session

    @property
    def client(self) -> str:
        peer = self.session.peer if self.session else None
        if isinstance(peer, tuple):
            return f"[{peer[0]}]:{peer[1]}"
        return "[unix]"

    # -- verbs -----------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._set_rset_state()  # type: ignore[no-untyped-call]
        session = self._session()
        session.extended_smtp = True
        session.host_name = hostname
        mechanisms = " ".join(sorted(self._auth_methods))
        lines = [self.hostname, f"AUTH {mechanisms}", "ATRN", "ENHANCEDSTATUSCODES"]
        for line in lines[:-1]:
            await self.push(f"250-{line}")
        await self.push(f"250 {lines[-1]}")

    async def _refuse_before_atrn(self, arg: str) -> None:
        await self.push(replies.ODMR_COMMAND_REFUSED)

    # RFC 2645: before the reversal only EHLO, AUTH, ATRN, QUIT (and RSET, NOOP).
    smtp_HELO = smtp_MAIL = smtp_RCPT = smtp_DATA = _refuse_before_atrn
    smtp_VRFY = smtp_EXPN = smtp_HELP = _refuse_before_atrn

    async def auth_CRAM__MD5(self, _: object, args: list[str]) -> AuthResult:
        if len(args) > 1:  # CRAM-MD5 has no initial response (RFC 4954)
            return AuthResult(success=False, handled=False, message="501 5.5.4 Syntax error")
        challenge = f"<{os.getpid()}.{time.time_ns()}@{self.hostname}>".encode()
        response = await self.challenge_auth(challenge)
        if response is MISSING:
            return AuthResult(success=False, handled=True)
        user, _, digest = response.decode("utf-8", "replace").rpartition(" ")
        stored = self.context.accounts().credential(user, "cram-md5")
        if stored is not None and cram.verify(stored, challenge, digest):
            self.user = user
            log.info("%s: sasl_method=CRAM-MD5, sasl_username=%s", self.client, user)
            return AuthResult(success=True, auth_data=user)
        log.warning("%s: SASL CRAM-MD5 authentication failed, sasl_username=%s",
                    self.client, user[:64])
        return AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)

    async def smtp_ATRN(self, arg: str | None) -> None:
        session = self._session()
        if not session.host_name:
            await self.push(replies.EHLO_FIRST)
            return
        if not session.authenticated or self.user is None:
            await self.push(replies.AUTH_REQUIRED)
            return
        accounts = self.context.accounts()
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
            await self.push(replies.ATRN_REFUSED)
            return
        # aiosmtpd cancels the command coroutine as soon as the peer closes;
        # the ATRN work (settling outcomes, releasing leases) must finish
        # anyway, so it runs as its own task that the cancellation cannot reach.
        self._atrn_task = asyncio.create_task(self._atrn(domains))
        await asyncio.shield(self._atrn_task)

    async def _atrn(self, domains: list[str]) -> None:
        queue = self.context.queue
        leases = LeaseKeeper(queue.index, self.context.lease_seconds)
        reversing = False
        try:
            if not await leases.acquire(domains):
                log.info("%s: ATRN %s: busy (another session collects)", self.client,
                         ",".join(domains))
                await self.push(replies.ATRN_BUSY)
                return
            counts = [await queue.index.count(d) for d in domains]
            if not any(counts):
                await self.push(replies.ATRN_NO_MAIL)
                return
            log.info("%s: ATRN user=%s domains=%s held=%d: reversing", self.client,
                     self.user, ",".join(domains), sum(counts))
            reversing = True
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
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        relay = Relay(self._reader, self._writer, self.context.queue,
                      hostname=self.hostname, peer=f"customer{self.client}",
                      timeouts=self.context.timeouts, keep_going=lambda: not leases.lost)
        try:
            report = await relay.drain(domains)
            log.info("%s: disconnect after ATRN: delivered=%d deferred=%d failed=%d",
                     self.client, report.delivered, report.deferred, report.failed)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError,
                ProtocolError) as exc:
            log.warning("%s: lost connection after ATRN: %s; undelivered mail stays held",
                        self.client, exc or type(exc).__name__)
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

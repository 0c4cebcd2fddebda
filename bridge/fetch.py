"""``odmr-bridge fetch``: the customer's side of ODMR (RFC 2645).

Open the local MTA first (down: exit 7 before asking for anything), connect
to the provider (TLS on connect, or STARTTLS), EHLO, AUTH (SCRAM-SHA-256 when
offered, else CRAM-MD5; PLAIN or LOGIN only under TLS), ``ATRN``; after its
``250`` the roles reverse and :mod:`odmr_bridge.fetch_session` serves the
provider with the local MTA's verdicts.

Exit codes, for cron jobs and systemd (see :data:`EXIT_CODES`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import signal
import socket
import ssl

import scramp

from odmr_bridge.fetch_config import FetchSettings
from odmr_bridge.fetch_session import LocalMtaLost, ReversedSession, SessionReport
from odmr_bridge.local_mta import LocalMta, LocalMtaError
from odmr_bridge.smtp_client import Extensions, ProtocolError, Reply, read_reply

log = logging.getLogger("odmr_bridge.fetch")

EXIT_COLLECTED = 0
EXIT_NO_MAIL = 1
EXIT_USAGE = 2
EXIT_AUTH_FAILED = 3
EXIT_REFUSED = 4
EXIT_BUSY = 5
EXIT_UNREACHABLE = 6
EXIT_LOCAL_MTA = 7
EXIT_CODES = {
    EXIT_COLLECTED: "mail collected (the session ended with the provider's QUIT)",
    EXIT_NO_MAIL: "no mail waiting (453)",
    EXIT_USAGE: "usage or configuration error",
    EXIT_AUTH_FAILED: "authentication failed (535, 530, or no usable mechanism)",
    EXIT_REFUSED: "ATRN refused (450): a domain this user may not collect",
    EXIT_BUSY: "provider busy or unavailable (451, 421, or another error reply)",
    EXIT_UNREACHABLE: "provider unreachable, TLS failed, or connection lost mid-session",
    EXIT_LOCAL_MTA: "local MTA unavailable: the mail stays held at the provider",
}


class FetchError(Exception):
    """Why a collection ended early: a one-line message and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Outcome:
    code: int
    message: str
    report: SessionReport | None = None


def tls_context(settings: FetchSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def cram_md5_response(user: str, password: bytes, challenge_b64: str) -> str:
    challenge = base64.b64decode(challenge_b64)
    digest = hmac.new(password, challenge, hashlib.md5).hexdigest()
    return base64.b64encode(f"{user} {digest}".encode()).decode()


def choose_mechanism(offered: list[str], secure: bool) -> str | None:
    """SCRAM-SHA-256, else CRAM-MD5 (also when AUTH is not listed: RFC 2645 makes it
    mandatory); PLAIN, LOGIN only under TLS."""
    names = [m.upper() for m in offered]
    if "SCRAM-SHA-256" in names:
        return "SCRAM-SHA-256"
    if "CRAM-MD5" in names or not names:
        return "CRAM-MD5"
    if secure:
        for mechanism in ("PLAIN", "LOGIN"):
            if mechanism in names:
                return mechanism
    return None


def atrn_outcome(reply: Reply) -> FetchError:
    """The exit for an ATRN reply other than 250, with its one-line message."""
    if reply.code == 453:
        return FetchError(f"no mail waiting ({reply})", EXIT_NO_MAIL)
    if reply.code == 450:
        return FetchError(f"ATRN refused: the provider will not give this user these "
                          f"domains ({reply})", EXIT_REFUSED)
    if reply.code == 451:
        return FetchError(f"provider busy: cannot serve ATRN now, another session may hold "
                          f"the domains; try later ({reply})", EXIT_BUSY)
    if reply.code == 530:
        return FetchError(f"ATRN needs authentication ({reply})", EXIT_AUTH_FAILED)
    if reply.code in (500, 501, 502, 504):
        return FetchError(f"provider does not take ATRN as we sent it ({reply})",
                          EXIT_REFUSED)
    return FetchError(f"ATRN failed: {reply}", EXIT_BUSY)


class ProviderSession:
    """The ODMR client dialogue up to the reversal."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.secure = False
        self.extensions = Extensions()

    async def reply(self) -> Reply:
        try:
            return await read_reply(self.reader, self.settings.timeout)
        except (ConnectionError, TimeoutError, ProtocolError) as exc:
            raise FetchError(f"lost the provider: {exc}", EXIT_UNREACHABLE) from None

    async def command(self, line: str) -> Reply:
        self.writer.write(line.encode() + b"\r\n")
        try:
            await self.writer.drain()
        except OSError as exc:
            raise FetchError(f"lost the provider: {exc}", EXIT_UNREACHABLE) from None
        return await self.reply()

    async def connect(self) -> None:
        s = self.settings
        context = tls_context(s) if s.tls != "none" else None
        name = s.server_name or s.host
        try:
            async with asyncio.timeout(s.timeout):
                self.reader, self.writer = await asyncio.open_connection(
                    s.host, s.port, limit=1 << 20,
                    ssl=context if s.tls == "tls" else None,
                    server_hostname=name if s.tls == "tls" else None)
        except ssl.SSLError as exc:
            raise FetchError(f"TLS with {s.host}:{s.port} failed: {exc}",
                             EXIT_UNREACHABLE) from None
        except (OSError, TimeoutError) as exc:
            raise FetchError(f"provider {s.host}:{s.port} unreachable: {exc}",
                             EXIT_UNREACHABLE) from None
        self.secure = s.tls == "tls"
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        greeting = await self.reply()
        if greeting.code != 220:
            raise FetchError(f"provider busy: {greeting}", EXIT_BUSY)
        await self.ehlo()
        if s.tls == "starttls":
            if "STARTTLS" not in self.extensions:
                raise FetchError(f"provider {s.host} does not offer STARTTLS (set tls = "
                                 "\"tls\" for TLS on connect)", EXIT_UNREACHABLE)
            reply = await self.command("STARTTLS")
            if reply.code != 220:
                raise FetchError(f"STARTTLS refused: {reply}", EXIT_UNREACHABLE)
            assert context is not None
            try:
                async with asyncio.timeout(s.timeout):
                    await self.writer.start_tls(context, server_hostname=name)
            except (ssl.SSLError, OSError, TimeoutError) as exc:
                raise FetchError(f"TLS with {s.host}:{s.port} failed: {exc}",
                                 EXIT_UNREACHABLE) from None
            self.secure = True
            await self.ehlo()

    async def ehlo(self) -> None:
        reply = await self.command(f"EHLO {self.settings.hostname}")
        if reply.kind != 2:
            raise FetchError(f"provider refused EHLO: {reply}", EXIT_BUSY)
        self.extensions = Extensions.from_ehlo(reply)

    async def authenticate(self) -> None:
        s = self.settings
        offered = self.extensions.names.get("AUTH", "").split()
        mechanism = choose_mechanism(offered, self.secure)
        if mechanism is None:
            raise FetchError(f"no usable AUTH mechanism (offered: {' '.join(offered)}; "
                             "PLAIN and LOGIN only under TLS)", EXIT_AUTH_FAILED)
        if mechanism == "SCRAM-SHA-256":
            reply = await self._scram()
        elif mechanism == "CRAM-MD5":
            challenge = await self.command("AUTH CRAM-MD5")
            reply = challenge if challenge.code != 334 else await self.command(
                cram_md5_response(s.user, s.password, challenge.text))
        elif mechanism == "PLAIN":
            blob = b"\0" + s.user.encode() + b"\0" + s.password
            reply = await self.command("AUTH PLAIN " + base64.b64encode(blob).decode())
        else:
            reply = await self.command("AUTH LOGIN " + base64.b64encode(s.user.encode()).decode())
            if reply.code == 334:
                reply = await self.command(base64.b64encode(s.password).decode())
        if reply.code != 235:
            raise FetchError(f"authentication as {s.user} failed ({mechanism}): {reply}",
                             EXIT_AUTH_FAILED if reply.kind == 5 else EXIT_BUSY)

    async def _scram(self) -> Reply:
        s = self.settings
        client = scramp.ScramClient(["SCRAM-SHA-256"], s.user, s.password.decode("utf-8"))
        first = base64.b64encode(client.get_client_first().encode()).decode()
        reply = await self.command(f"AUTH SCRAM-SHA-256 {first}")
        if reply.code != 334:
            return reply
        try:
            client.set_server_first(base64.b64decode(reply.text).decode())
            final = base64.b64encode(client.get_client_final().encode()).decode()
        except (scramp.ScramException, ValueError) as exc:
            await self.command("*")
            raise FetchError(f"SCRAM with the provider failed: {exc}",
                             EXIT_AUTH_FAILED) from None
        reply = await self.command(final)
        if reply.code != 334:
            return reply
        try:  # the provider proves it knows our credentials, too
            client.set_server_final(base64.b64decode(reply.text).decode())
        except (scramp.ScramException, ValueError) as exc:
            await self.command("*")
            raise FetchError(f"provider failed SCRAM server authentication: {exc}",
                             EXIT_AUTH_FAILED) from None
        return await self.command("")

    async def atrn(self) -> None:
        domains = ",".join(self.settings.domains)
        reply = await self.command(f"ATRN {domains}".rstrip())
        if reply.code != 250:
            with contextlib.suppress(FetchError):
                await self.command("QUIT")
            raise atrn_outcome(reply)

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, AttributeError):
            self.writer.close()


async def collect(settings: FetchSettings) -> Outcome:
    """One collection: the exit code, a one-line message, and what was delivered."""
    try:
        local = await LocalMta.open(settings.local, settings.hostname, settings.timeout)
    except LocalMtaError as exc:
        return Outcome(EXIT_LOCAL_MTA, f"{exc}; nothing collected, the mail stays held")
    provider = ProviderSession(settings)
    try:
        await provider.connect()
        await provider.authenticate()
        await provider.atrn()
        session = ReversedSession(provider.reader, provider.writer, local, settings.hostname,
                                  settings.timeout, line_per_write=provider.secure)
        try:
            report = await session.run()
        except LocalMtaLost as exc:
            return Outcome(EXIT_LOCAL_MTA, f"{exc}; what it had not accepted stays held",
                           session.report)
        except (ConnectionError, TimeoutError, ProtocolError, OSError) as exc:
            r = session.report
            return Outcome(EXIT_UNREACHABLE, f"lost the provider mid-session after "
                           f"{r.messages} message(s): {exc}", r)
        return Outcome(EXIT_COLLECTED, f"collected {report.messages} message(s) for "
                       f"{report.recipients} recipient(s); {report.deferred} deferred, "
                       f"{report.failed} refused", report)
    except FetchError as exc:
        return Outcome(exc.code, str(exc))
    finally:
        provider.close()
        await local.quit()


async def run(settings: FetchSettings, interval: float | None = None) -> int:
    """Collect once, or every *interval* seconds until SIGTERM/SIGINT (then exit 0)."""
    if interval is None:
        outcome = await collect(settings)
        _report(outcome)
        return outcome.code
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        outcome = await collect(settings)
        _report(outcome)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
    return 0


def _report(outcome: Outcome) -> None:
    level = logging.INFO if outcome.code in (EXIT_COLLECTED, EXIT_NO_MAIL) else logging.ERROR
    log.log(level, "%s (exit %d)", outcome.message, outcome.code)

"""LMTP intake (RFC 2033): the host MTA hands ATRN-domain mail to us.

aiosmtpd's ``LMTP`` class answers DATA with a single reply; RFC 2033 wants
one per accepted recipient, and Postfix delivers twice without them.  The
handler below sends that one reply per recipient, each naming the queue ID
of the copy held for the recipient's domain.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from typing import IO, Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session

from odmr_bridge import metrics, replies, smtpd_internals
from odmr_bridge.accounts import recipient_domain
from odmr_bridge.coalesce import CoalescingTransport
from odmr_bridge.data_reader import read_message
from odmr_bridge.dsn import MAIL_PARAMETERS, RCPT_PARAMETERS, DsnSyntaxError, split_parameters
from odmr_bridge.queue import HoldQueue
from odmr_bridge.spool import Recipient

log = logging.getLogger("odmr_bridge.lmtp")
# Postfix's log tools (pflogsumm, ...) count a message as received from the
# "smtpd" service's "QID: client=" line, so the intake logs that one as smtpd.
received_log = logging.getLogger("odmr_bridge.smtpd")

# The spool's file system is full (or the spool user's quota is).
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

# Intake parameters worth keeping for the reversed session (SIZE is recomputed).
_KEPT_MAIL_OPTIONS = ("BODY=", "SMTPUTF8", "RET=", "ENVID=")
# local@domain with no quoting, comments, routes or spaces; or empty (null sender).
_PLAIN_ADDRESS = re.compile(r"(?:[^\s<>()\[\]\\\",;:@]+@[^\s<>()\[\]\\\",;:@]+)?")


class IntakeHandler:
    """aiosmtpd hooks: admit recipients of ATRN domains, commit at end of DATA."""

    def __init__(self, queue: HoldQueue,
                 atrn_domains: Callable[[], Callable[[str], bool]]) -> None:
        self.queue = queue
        # Called once per connection: a connection keeps the domains it started with.
        self.atrn_domains = atrn_domains

    async def handle_EHLO(self, server: LMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN"]
        return [responses[0], *extra, *(r for r in responses[1:] if "AUTH" not in r)]

    async def handle_MAIL(self, server: IntakeServer, session: Session, envelope: SmtpEnvelope,
                          address: str, mail_options: list[str]) -> str:
        # Keep "<>" here: aiosmtpd treats an empty mail_from as "no MAIL yet".
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.mail_options.extend(server.mail_dsn)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: IntakeServer, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        domain = recipient_domain(address)
        if domain is None:
            return replies.RCPT_BAD_ADDRESS.format(rcpt=address)
        if not server.is_atrn_domain(domain):
            reply = replies.RCPT_NOT_ATRN_DOMAIN.format(rcpt=address)
            received_log.info("NOQUEUE: reject: RCPT from %s: %s; from=<%s> to=<%s> "
                              "proto=LMTP helo=<%s>", server.client, reply,
                              _sender(envelope), address, session.host_name)
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        server.recipient_dsn.append(server.pending_rcpt_dsn)
        return replies.RCPT_OK

    async def handle_DATA(self, server: IntakeServer, session: Session,
                          envelope: SmtpEnvelope) -> str:
        server.replying_per_recipient()
        by_domain: dict[str, list[Recipient]] = defaultdict(list)
        for address, dsn in zip(envelope.rcpt_tos, server.recipient_dsn, strict=True):
            domain = recipient_domain(address)
            assert domain is not None  # checked at RCPT
            by_domain[domain].append(Recipient(address=address, options=dsn))
        sender = _sender(envelope)
        options = [o for o in envelope.mail_options if o.startswith(_KEPT_MAIL_OPTIONS)]
        body = server.data
        assert body is not None, "smtp_DATA read it"
        try:
            held = await self.queue.commit(sender, options, dict(by_domain), body,
                                           trace=server.received_header)
        except Exception as exc:
            log.error("warning: queue commit failed from=<%s> nrcpt=%d: %s: %s", sender,
                      len(envelope.rcpt_tos), type(exc).__name__, exc)
            full = isinstance(exc, OSError) and exc.errno in _NO_SPACE
            metrics.INTAKE_FAILURES.labels("storage_full" if full else type(exc).__name__).inc()
            template = replies.STORAGE_FULL if full else replies.LOCAL_ERROR
            lines = [template.format(rcpt=r) for r in envelope.rcpt_tos]
        else:
            metrics.INTAKE_MESSAGES.inc(len(held))
            metrics.INTAKE_BYTES.inc(sum(copy.size for copy in held.values()))
            for copy in held.values():
                received_log.info("%s: client=%s", copy.qid, server.client)
                log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue deferred for %s)", copy.qid,
                         sender, copy.size, len(copy.recipients), copy.domain)
            lines = [
                replies.QUEUED.format(rcpt=r, qid=held[recipient_domain(r) or ""].qid)
                for r in envelope.rcpt_tos
            ]
        # RFC 2033 section 4.2: one reply per accepted recipient, in RCPT order.
        for line in lines[:-1]:
            await server.push(line)
        return lines[-1]


def _sender(envelope: SmtpEnvelope) -> str:
    return "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)


class IntakeServer(smtpd_internals.AddressParser, LMTP):
    """aiosmtpd's LMTP with the bridge's limits; one instance per connection.

    aiosmtpd itself ends some DATA phases with one error reply (message too
    big, line too long).  LMTP needs that reply once per accepted recipient,
    so after ``354`` a 4xx/5xx reply is repeated for each of them.  The
    handler's own per-recipient replies switch this off first.
    """

    def __init__(self, handler: IntakeHandler, **kwargs: Any) -> None:
        super().__init__(handler, enable_SMTPUTF8=True, **kwargs)
        self.handler = handler
        self.is_atrn_domain = handler.atrn_domains()
        # The current transaction's content, as it arrives (in smtp_DATA).
        self.data: IO[bytes] | None = None
        self._recipients_in_data = 0
        self._fan_out = 0
        # DSN parameters of the current transaction, kept out of aiosmtpd's
        # parser (which refuses RCPT parameters and upper-cases the rest).
        self.mail_dsn: list[str] = []
        self.pending_rcpt_dsn: list[str] = []
        self.recipient_dsn: list[list[str]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The answers to one pipelined group leave in one send (coalesce.py).
        assert isinstance(transport, asyncio.Transport)
        super().connection_made(CoalescingTransport(transport))

    @property
    def client(self) -> str:
        """``helo[ip]`` as Postfix logs a client (no reverse DNS look-up here)."""
        session = self.session
        peer = session.peer if session is not None else None
        address = str(peer[0]) if isinstance(peer, tuple) else "unix"
        name = session.host_name if session is not None and session.host_name else "unknown"
        return f"{name}[{address}]"

    def received_header(self, qid: str, recipients: list[Recipient]) -> bytes:
        """Our hop's trace line (RFC 5321 4.4), as Postfix writes it."""
        session = self.session
        helo = session.host_name if session is not None and session.host_name else "unknown"
        peer = session.peer if session is not None else None
        source = f"[{peer[0]}]" if isinstance(peer, tuple) else "local"
        recipient = f"\r\n\tfor <{recipients[0].address}>" if len(recipients) == 1 else ""
        return (f"Received: from {helo} ({source})\r\n\tby {self.hostname} (odmr-bridge)"
                f" with LMTP id {qid}{recipient};\r\n\t{email.utils.formatdate(localtime=True)}"
                "\r\n").encode("utf-8", "surrogateescape")

    async def _without_dsn(self, arg: str | None,
                           names: tuple[str, ...]) -> tuple[str | None, list[str]] | None:
        """Split DSN parameters off *arg*; None (after a 501) if they are malformed."""
        if not arg:
            return arg, []
        try:
            return split_parameters(arg, names)
        except DsnSyntaxError as exc:
            await self.push(f"501 5.5.4 Syntax error in parameters: {exc}")
            return None

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.mail_dsn, self.recipient_dsn = [], []
        if (split := await self._without_dsn(arg, MAIL_PARAMETERS)) is not None:
            arg, self.mail_dsn = split
            await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.pending_rcpt_dsn = []
        if (split := await self._without_dsn(arg, RCPT_PARAMETERS)) is not None:
            arg, self.pending_rcpt_dsn = split
            await super().smtp_RCPT(arg)

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        """``<local@domain> params`` without the RFC 5322 parser when it is plain.

        The host MTA sends plain angle addresses; aiosmtpd's general parser
        (email._header_value_parser) is the costliest step of an intake.
        Anything unusual (quotes, comments, routes) still goes to it.
        """
        stripped = arg.lstrip()
        end = stripped.find(">")
        if stripped.startswith("<") and end > 0:
            address = stripped[1:end]
            if _PLAIN_ADDRESS.fullmatch(address):
                return address or "<>", stripped[end + 1:].lstrip()
        return super().parse_address(arg)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with :func:`read_message` instead of its line-by-line loop."""
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self._recipients_in_data = len(self.envelope.rcpt_tos)
        reader, writer = smtpd_internals.streams(self)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            with self.handler.queue.scratch() as self.data:
                try:
                    error = await read_message(reader, self.data, self.data_size_limit,
                                               self.line_length_limit)
                except (asyncio.CancelledError, asyncio.IncompleteReadError):
                    writer.close()  # the connection was lost during DATA
                    raise
                if error is not None:
                    smtpd_internals.end_data(self)
                    await self.push(error)  # repeated for each recipient (push)
                    return
                status = await smtpd_internals.call_data_hook(self)
            smtpd_internals.end_data(self)
            await self.push(status)
        finally:
            self.data = None
            self._recipients_in_data = self._fan_out = 0

    def replying_per_recipient(self) -> None:
        self._fan_out = 0

    async def push(self, status: Any) -> None:
        text = status if isinstance(status, str) else bytes(status).decode("utf-8", "replace")
        if text.startswith("354"):
            self._fan_out = self._recipients_in_data
        elif self._fan_out and text[:1] in "45":
            repeats, self._fan_out = self._fan_out - 1, 0
            for _ in range(repeats):
                await super().push(status)
        await super().push(status)

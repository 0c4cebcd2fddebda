"""The reversed ODMR session, customer side: we are the SMTP server, the local
MTA decides.

Every MAIL, RCPT, DATA, RSET and NOOP goes to the local MTA and its reply,
verbatim, goes back to the provider, in order: the provider's verdict per
recipient is exactly the local MTA's.  Commands that arrive together (the
provider pipelines MAIL, RCPT..., DATA) go to the local MTA together, and
their replies come back together.  With LMTP the per-recipient replies
after DATA become one (:func:`odmr_bridge.fetch_protocol.combine_data_replies`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import Callable

from odmr_bridge.fetch_protocol import (
    BYE,
    GREETING,
    HELO_OK,
    NOT_IMPLEMENTED,
    CommandReader,
    DataReader,
    combine_data_replies,
    ehlo_reply,
    format_reply,
    verb_of,
)
from odmr_bridge.local_mta import LocalMta, quickack
from odmr_bridge.smtp_client import ProtocolError, Reply

log = logging.getLogger("odmr_bridge.fetch")
READ_SIZE = 256 * 1024
FORWARDED = {"MAIL", "RCPT", "RSET", "NOOP", "DATA"}


class LocalMtaLost(Exception):
    """The local MTA went away mid-session; the provider keeps what was not accepted."""


@dataclasses.dataclass
class SessionReport:
    messages: int = 0  # accepted by the local MTA (2xx after DATA)
    recipients: int = 0  # of those messages
    deferred: int = 0  # messages the provider keeps (4xx)
    failed: int = 0  # messages refused for good (5xx): the provider bounces
    completed: bool = False  # the provider said QUIT


def _text(line: str) -> Reply:
    return Reply(int(line[:3]), (line[4:],))


@dataclasses.dataclass
class _Transaction:
    rcpt_accepted: int = 0


class ReversedSession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 local: LocalMta, hostname: str, timeout: float,
                 line_per_write: bool = False,
                 on_message: Callable[[Reply, int], None] = lambda _r, _n: None) -> None:
        self.reader = reader
        self.writer = writer
        self.local = local
        self.hostname = hostname
        self.timeout = timeout
        self.line_per_write = line_per_write
        self.on_message = on_message
        self.report = SessionReport()
        self.commands = CommandReader()
        self.pending: list[str | None] = []  # per forwarded command: its verb; None: ours
        self.ours: list[Reply] = []
        self.transaction = _Transaction()
        self._out: list[bytes] = []
        self._socket = writer.get_extra_info("socket")

    # -- output to the provider ------------------------------------------------

    def _say(self, reply: Reply) -> None:
        self._out.append(format_reply(reply))

    async def _flush(self) -> None:
        if not self._out:
            return
        if self.line_per_write:
            for chunk in self._out:
                for line in chunk.splitlines(keepends=True):
                    self.writer.write(line)
        else:
            self.writer.write(b"".join(self._out))
        self._out.clear()
        await self.writer.drain()

    # -- the loop ----------------------------------------------------------------

    async def run(self) -> SessionReport:
        if self._socket is not None and self._socket.family != socket.AF_UNIX:
            with contextlib.suppress(OSError):
                self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._say(_text(GREETING.format(hostname=self.hostname)))
        await self._flush()
        while not self.report.completed:
            data = await self._read()
            self.commands.feed(data)
            await self._handle_lines()
        return self.report

    async def _read(self) -> bytes:
        quickack(self.writer)
        async with asyncio.timeout(self.timeout):
            data = await self.reader.read(READ_SIZE)
        if not data:
            raise ConnectionResetError("provider closed the connection")
        return data

    async def _handle_lines(self) -> None:
        """Every complete command so far; a DATA body is read in between."""
        while not self.report.completed:
            if not await self._handle_until_body():
                return
            await self._body()  # leaves what followed the body in self.commands

    async def _handle_until_body(self) -> bool:
        """Handle buffered lines; True when a body must be read now (the local MTA said 354)."""
        for line in self.commands.lines():
            verb = verb_of(line)
            if verb in FORWARDED:
                self.local.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
                self.pending.append(verb)
                if verb == "DATA" or not self.local.pipelining:
                    await self._answer()
                if verb == "DATA" and self.transaction_open:
                    return True
            elif verb == "QUIT":
                await self._answer()
                self._say(_text(BYE))
                await self._flush()
                self.report.completed = True
                return False
            elif verb in ("EHLO", "HELO"):
                self._queue_ours(ehlo_reply(self.hostname, self.local.extensions)
                                 if verb == "EHLO" else _text(HELO_OK.format(
                                     hostname=self.hostname)))
                # A new EHLO resets the transaction, on the local MTA too.
                if self._local_has_transaction:
                    self.local.send(b"RSET\r\n")
                    self.pending.append("RSET-quiet")
            else:
                self._queue_ours(_text(NOT_IMPLEMENTED))
        await self._answer()
        return False

    transaction_open = False
    _local_has_transaction = False

    def _queue_ours(self, reply: Reply) -> None:
        self.pending.append(None)
        self.ours.append(reply)

    async def _answer(self) -> None:
        """Send the local MTA what is buffered, then every pending reply, in order."""
        if not self.pending:
            return
        try:
            await self.local.drain()
            for verb in self.pending:
                if verb is None:
                    self._say(self.ours.pop(0))
                    continue
                reply = await self.local.reply()
                self._track(verb, reply)
                if verb != "RSET-quiet":
                    self._say(reply)
        except (OSError, TimeoutError, ProtocolError) as exc:
            raise LocalMtaLost(f"local MTA {self.local.settings.describe()}: {exc}") from None
        finally:
            self.pending.clear()
        await self._flush()

    def _track(self, verb: str, reply: Reply) -> None:
        if verb == "MAIL" and reply.kind == 2:
            self.transaction = _Transaction()
            self._local_has_transaction = True
        elif verb == "RCPT" and reply.kind == 2:
            self.transaction.rcpt_accepted += 1
        elif verb in ("RSET", "RSET-quiet"):
            self.transaction = _Transaction()
            self._local_has_transaction = False
        self.transaction_open = verb == "DATA" and reply.code == 354

    async def _body(self) -> None:
        """Forward the body, then give the provider the local MTA's verdict."""
        body = DataReader()
        data = self.commands.take_rest()
        while True:
            piece = body.feed(data) if data else b""
            if piece:
                self.local.send(piece)
                if self.local.writer.transport.get_write_buffer_size() > READ_SIZE:
                    await self._drain_local()
            if body.done:
                break
            data = await self._read()
        self.local.send(b".\r\n")
        self.commands.feed(body.rest)
        await self._drain_local()
        expected = self.transaction.rcpt_accepted if self.local.lmtp else 1
        try:
            replies = [await self.local.reply() for _ in range(max(1, expected))]
        except (OSError, TimeoutError, ProtocolError) as exc:
            raise LocalMtaLost(f"local MTA {self.local.settings.describe()}: {exc}") from None
        verdict = combine_data_replies(replies)
        if self.local.lmtp and len(replies) > 1 and verdict.code == 451:
            log.warning("local MTA accepted %d of %d recipients after DATA; the provider "
                        "keeps the message (%s)",
                        sum(r.kind == 2 for r in replies), len(replies),
                        "; ".join(str(r) for r in replies if r.kind != 2))
        self._count(verdict, self.transaction.rcpt_accepted)
        self.transaction = _Transaction()
        self._local_has_transaction = False
        self.transaction_open = False
        self._say(verdict)
        await self._flush()

    async def _drain_local(self) -> None:
        try:
            await self.local.drain()
        except OSError as exc:
            raise LocalMtaLost(f"local MTA {self.local.settings.describe()}: {exc}") from None

    def _count(self, verdict: Reply, recipients: int) -> None:
        if verdict.kind == 2:
            self.report.messages += 1
            self.report.recipients += recipients
        elif verdict.kind == 4:
            self.report.deferred += 1
        else:
            self.report.failed += 1
        self.on_message(verdict, recipients)

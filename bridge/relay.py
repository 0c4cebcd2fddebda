"""The provider's side of a reversed ODMR session: deliver held mail as an SMTP client.

After ``250 OK now reversing the connection`` the customer speaks first (its
``220``); we send EHLO (HELO if refused), then every held message of the
granted domains, then QUIT.  Each recipient's answer is settled in the hold
queue as it arrives: 2xx delivered, 4xx stays held, 5xx failed.  A lost
connection at any point leaves everything not yet settled held.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

from odmr_bridge import metrics
from odmr_bridge.logs import seconds
from odmr_bridge.queue import HoldQueue, Outcome
from odmr_bridge.smtp_client import Extensions, Reply, crlf_line_ends, dot_stuff, read_reply
from odmr_bridge.spool import (
    DELIVERED,
    FAILED,
    PENDING,
    Envelope,
    Readable,
    Recipient,
    gathered,
    read_chunks,
)

log = logging.getLogger("odmr_bridge.relay")
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)

BODY_CHUNK = 64 * 1024
# Removals of delivered messages are made durable (a directory fsync) this often.
SYNC_EVERY = 100


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """RFC 5321 4.5.3.2 client timeouts, in seconds."""

    greeting: float = 300.0
    command: float = 300.0
    data_start: float = 120.0
    data_end: float = 600.0


class CustomerClosing(Exception):
    """The customer answered 421: it is closing the session; send nothing more."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclasses.dataclass
class DrainReport:
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    messages: int = 0
    completed: bool = False

    def count(self, state: str) -> None:
        if state == DELIVERED:
            self.delivered += 1
        elif state == FAILED:
            self.failed += 1
        else:
            self.deferred += 1


@dataclasses.dataclass
class _InFlight:
    """A transaction whose body is sent and whose final reply is still to come:
    the next message's MAIL, RCPT and DATA go out before it is read (RFC 2920
    3.1: message content may be the first "command" of a group)."""

    envelope: Envelope
    results: dict[str, Reply]  # the RCPT refusals so far
    accepted: list[str]
    started: float
    # The message's checkout, closed once the reply is settled.
    checkout: contextlib.AsyncExitStack = dataclasses.field(
        default_factory=contextlib.AsyncExitStack)


def _state_for(reply: Reply) -> str:
    if reply.kind == 2:
        return DELIVERED
    if reply.kind == 5:
        return FAILED
    return PENDING


def _needs_8bit(envelope: Envelope) -> bool:
    return "BODY=8BITMIME" in envelope.mail_options


def _needs_smtputf8(envelope: Envelope) -> bool:
    return "SMTPUTF8" in envelope.mail_options


class Relay:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        queue: HoldQueue,
        *,
        hostname: str,
        peer: str,
        timeouts: Timeouts,
        keep_going: Callable[[], bool] = lambda: True,
        line_per_write: bool = False,
        before_quit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.queue = queue
        self.hostname = hostname
        self.relay_name = peer
        self.timeouts = timeouts
        self.keep_going = keep_going
        # Run after the last settle, right before QUIT (the session frees its domains).
        self.before_quit = before_quit
        # Over TLS each line goes in its own write, hence its own TLS record:
        # fetchmail's relay loop stalls on several lines in one record.
        self.line_per_write = line_per_write
        self.extensions = Extensions()
        self.report = DrainReport()  # so far, also when the connection is lost
        self._socket = writer.get_extra_info("socket")
        # For Postfix's delays=a/b/c/d: when the session began, and how long
        # greeting and EHLO took (counted once, in the first delivery).
        self._started = time.time()
        self._setup: float | None = None
        # Why the session stops early: the customer's 421 (then not even QUIT
        # is sent), or its LIMITS MAILMAX.
        self.ended_by: str = ""
        self._customer_closed = False
        self._transactions = 0
        # (qid, recipient) already tried in this session: a 4xx is not retried.
        self._tried: set[tuple[str, str]] = set()
        self._in_flight: _InFlight | None = None
        # A body's last piece, kept to leave in one send with the next group.
        self._body_tail = b""

    # -- the dialogue --------------------------------------------------------

    async def _send(self, *lines: str) -> None:
        encoded = [line.encode("utf-8") + b"\r\n" for line in lines]
        if self.line_per_write:
            for line in encoded:
                self.writer.write(line)
        else:  # one send() for a whole pipelined group, behind a body's last piece
            self.writer.write(b"".join([self._body_tail, *encoded]))
            self._body_tail = b""
        await self.writer.drain()

    def _flush_body_tail(self) -> None:
        if self._body_tail:
            self.writer.write(self._body_tail)
            self._body_tail = b""

    async def _reply(self, timeout: float) -> Reply:
        self._flush_body_tail()  # nothing followed the body: it goes now
        # Re-arm TCP_QUICKACK before every read: a delayed ACK to the customer's
        # reply would otherwise stall our next pipelined write (see README).
        if _QUICKACK is not None and self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        reply = await read_reply(self.reader, timeout)
        if reply.code == 421:
            raise CustomerClosing(reply)
        return reply

    async def _command(self, line: str, timeout: float) -> Reply:
        await self._send(line)
        return await self._reply(timeout)

    async def greet(self) -> bool:
        """Read the customer's 220 and introduce ourselves; False if it will not talk."""
        try:
            return await self._greet()
        except CustomerClosing as exc:
            log.warning("relay=%s: customer greeting: %s", self.relay_name, exc.reply)
            return False
        finally:
            self._setup = time.time() - self._started

    async def _greet(self) -> bool:
        greeting = await self._reply(self.timeouts.greeting)
        if greeting.code != 220:
            log.warning("relay=%s: customer greeting: %s", self.relay_name, greeting)
            return False
        reply = await self._command(f"EHLO {self.hostname}", self.timeouts.command)
        if reply.kind == 2:
            self.extensions = Extensions.from_ehlo(reply)
            return True
        reply = await self._command(f"HELO {self.hostname}", self.timeouts.command)
        if reply.kind != 2:
            log.warning("relay=%s: customer refused HELO: %s", self.relay_name, reply)
            return False
        return True

    async def quit(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError, asyncio.IncompleteReadError,
                                 CustomerClosing):
            await self._command("QUIT", self.timeouts.command)

    def _session_over(self) -> bool:
        """The lease is lost, the customer said 421, or its MAILMAX is used up."""
        if not self.ended_by:
            mail_max = self.extensions.limit("MAILMAX")
            if mail_max is not None and self._transactions >= mail_max:
                self.ended_by = f"LIMITS MAILMAX={mail_max} reached"
        return bool(self.ended_by) or not self.keep_going()

    async def drain(self, domains: list[str]) -> DrainReport:
        """Deliver every held message of *domains*, including mail arriving meanwhile."""
        report = self.report
        if not await self.greet():
            return report
        try:
            await self._drain(domains, report)
            try:
                await self._finish_in_flight()
            except CustomerClosing as exc:
                self.ended_by, self._customer_closed = str(exc.reply), True
        finally:
            if self._in_flight is not None:  # connection lost: it stays held
                await self._in_flight.checkout.aclose()
                self._in_flight = None
        if self.ended_by:
            log.warning("relay=%s: session ended early: %s; the rest stays held for the "
                        "next session", self.relay_name, self.ended_by)
        if self.keep_going() and not self._customer_closed:
            if self.before_quit is not None:
                await self.before_quit()
            await self.quit()
            report.completed = True
        return report

    async def _drain(self, domains: list[str], report: DrainReport) -> None:
        for domain in domains:
            attempted: set[str] = set()
            while not self._session_over():
                fresh = [q for q in await self.queue.held(domain) if q not in attempted]
                if not fresh:
                    break
                for qid in fresh:
                    attempted.add(qid)
                    # More than the customer's RCPTMAX: one transaction per group.
                    more = True
                    while more and not self._session_over():
                        async with contextlib.AsyncExitStack() as checkout:
                            found = await checkout.enter_async_context(
                                self.queue.checkout(domain, qid))
                            more = found is not None and await self.deliver(
                                *found, report, checkout)
                        if report.messages % SYNC_EVERY == 0:
                            self._flush_body_tail()  # not kept waiting for the store
                            await self.queue.sync()
                    if self._session_over():
                        break

    async def deliver(self, envelope: Envelope, body: Readable, report: DrainReport,
                      checkout: contextlib.AsyncExitStack | None = None) -> bool:
        """One transaction for pending recipients of one held message (at most the
        customer's LIMITS RCPTMAX); True if others are left for another one.

        With PIPELINING and a *checkout* to take over, the transaction may be
        left in flight: its body sent, its final reply read (and settled) after
        the next message's MAIL, RCPT and DATA went out, or at the end.
        """
        started = time.time()
        report.messages += 1
        untried = [r for r in envelope.pending() if (envelope.qid, r.address) not in self._tried]
        rcpt_max = self.extensions.limit("RCPTMAX")
        pending = untried[:rcpt_max] if rcpt_max else untried
        more = len(untried) > len(pending)
        self._tried.update((envelope.qid, r.address) for r in pending)
        refusal = self._local_refusal(envelope)
        if refusal is not None:
            replies = dict.fromkeys((r.address for r in pending), refusal)
        else:
            self._transactions += 1
            try:
                sent = await self._transaction(envelope, body, pending, started)
                if isinstance(sent, dict):
                    replies = sent
                elif more or checkout is None or "PIPELINING" not in self.extensions:
                    # Settled now: its next group needs it, or nothing could go meanwhile.
                    replies = await self._final_reply(sent)
                else:
                    sent.checkout = checkout.pop_all()
                    self._in_flight = sent
                    return False
            except CustomerClosing as exc:
                self.ended_by, self._customer_closed = str(exc.reply), True
                replies = dict.fromkeys((r.address for r in pending), exc.reply)
        await self._record(envelope, replies, started, time.time())
        return more

    async def _final_reply(self, flight: _InFlight) -> dict[str, Reply]:
        final = await self._reply(self.timeouts.data_end)
        flight.results.update(dict.fromkeys(flight.accepted, final))
        return flight.results

    async def _finish_in_flight(self) -> None:
        """Read and settle the final reply of the transaction left in flight."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return
        async with flight.checkout:
            try:
                replies = await self._final_reply(flight)
            except CustomerClosing as exc:  # recorded here, then the caller's to handle
                flight.results.update(dict.fromkeys(flight.accepted, exc.reply))
                await self._record(flight.envelope, flight.results, flight.started, time.time())
                raise
            await self._record(flight.envelope, replies, flight.started, time.time())

    async def _record(self, envelope: Envelope, replies: dict[str, Reply], started: float,
                      ended: float) -> None:
        """Log each recipient's answer as Postfix does and settle them in the queue."""
        # Postfix's delays: a (intake; not timed: ours takes milliseconds),
        # b (waiting in the queue), c (greeting and EHLO), d (the transaction).
        if self._setup is not None:  # the session's first delivery
            waited, setup, self._setup = self._started - envelope.arrival, self._setup, None
        else:
            waited, setup = started - envelope.arrival, 0.0
        delays = "/".join(map(seconds, (0.0, waited, setup, ended - started)))
        delay = seconds(ended - envelope.arrival)
        report = self.report
        # Each recipient's line first, then the queue's "removed" (Postfix's order).
        for address, reply in replies.items():
            state = _state_for(reply)
            status = {DELIVERED: "sent", FAILED: "bounced", PENDING: "deferred"}[state]
            report.count(state)
            metrics.RECIPIENTS.labels(status).inc()
            log.info("%s: to=<%s>, relay=%s, delay=%s, delays=%s, dsn=%s, status=%s (%s)",
                     envelope.qid, address, self.relay_name, delay, delays, reply.dsn, status,
                     reply)
        outcomes = {a: Outcome(_state_for(r), str(r)) for a, r in replies.items()}
        # A customer MTA without DSN cannot honour NOTIFY=SUCCESS: we report "relayed".
        try:
            await self.queue.settle(envelope, outcomes,
                                    report_success="DSN" not in self.extensions)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # A notice could not be stored (the store is full), so nothing was
            # recorded: the recipients stay held (those the customer took come
            # again next time), and the session goes on; deliveries free room.
            log.warning("%s: outcome not recorded, store full (%s); the recipients stay "
                        "held", envelope.qid, exc.strerror or exc)

    def _local_refusal(self, envelope: Envelope) -> Reply | None:
        """A reason not to send this message to this customer at all, as a reply."""
        if _needs_smtputf8(envelope) and "SMTPUTF8" not in self.extensions:
            return Reply(554, ("5.6.7 customer MTA does not support SMTPUTF8",))
        if _needs_8bit(envelope) and "8BITMIME" not in self.extensions:
            # RFC 6152: never send 8-bit data to a server that does not offer it.
            return Reply(450, ("4.6.0 customer MTA does not offer 8BITMIME; message held",))
        limit = self.extensions.size_limit()
        if limit is not None and envelope.size > limit:
            return Reply(552, (f"5.3.4 message size {envelope.size} exceeds customer "
                               f"limit {limit}",))
        return None

    def _mail_command(self, envelope: Envelope) -> str:
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={envelope.size}")
        if _needs_8bit(envelope):
            params.append("BODY=8BITMIME")
        if _needs_smtputf8(envelope):
            params.append("SMTPUTF8")
        if "DSN" in self.extensions:
            params += [o for o in envelope.mail_options if o.startswith(("RET=", "ENVID="))]
        return " ".join([f"MAIL FROM:<{envelope.sender}>", *params])

    def _rcpt_command(self, recipient: Recipient) -> str:
        params = recipient.options if "DSN" in self.extensions else []
        return " ".join([f"RCPT TO:<{recipient.address}>", *params])

    async def _transaction(self, envelope: Envelope, body: Readable,
                           pending: list[Recipient], started: float
                           ) -> dict[str, Reply] | _InFlight:
        """The replies to a transaction, or, once its body is sent, the transaction
        in flight (its final reply not read yet)."""
        timeout = self.timeouts.command
        recipients = [r.address for r in pending]
        envelope_lines = [self._mail_command(envelope)]
        envelope_lines += [self._rcpt_command(r) for r in pending]
        if "PIPELINING" in self.extensions:
            # RFC 2920: MAIL, every RCPT and DATA in one group, right behind the
            # previous message's body; that message's final reply comes first.
            await self._send(*envelope_lines, "DATA")
            await self._finish_in_flight()
            mail_reply = await self._reply(timeout)
            rcpt_replies = [await self._reply(timeout) for _ in recipients]
            data_reply = await self._reply(self.timeouts.data_start)
        else:  # nothing is left in flight without PIPELINING (deliver())
            mail_reply = await self._command(envelope_lines[0], timeout)
            rcpt_replies = []
            data_reply = Reply(503, ("5.5.1 no valid recipients (not sent)",))
            if mail_reply.kind == 2:
                for line in envelope_lines[1:]:
                    rcpt_replies.append(await self._command(line, timeout))
                if any(r.kind == 2 for r in rcpt_replies):
                    data_reply = await self._command("DATA", self.timeouts.data_start)
        if mail_reply.kind != 2:
            if data_reply.code == 354:  # a broken server; end the transaction cleanly
                await self._send(".")
                await self._reply(self.timeouts.data_end)
            await self._command("RSET", timeout)
            return dict.fromkeys(recipients, mail_reply)
        results = dict(zip(recipients, rcpt_replies, strict=True))
        accepted = [r for r in recipients if results[r].kind == 2]
        if data_reply.code != 354:
            if accepted:
                results.update(dict.fromkeys(accepted, data_reply))
            await self._command("RSET", timeout)
            return results
        if not accepted:  # 354 with no recipient: send an empty message's end
            await self._send(".")
            await self._reply(self.timeouts.data_end)
            return results
        await self._send_body(body)
        return _InFlight(envelope, results, accepted, started)

    async def _send_body(self, body: Readable) -> None:
        # Intake stores CRLF only; spools written before it did may hold bare
        # CR or LF, which must never reach a customer as a line end.
        pieces = dot_stuff(crlf_line_ends(read_chunks(body, BODY_CHUNK)))
        if self.line_per_write:
            for line in _lines(pieces):
                self.writer.write(line)
                if self.writer.transport.get_write_buffer_size() > BODY_CHUNK:
                    await self.writer.drain()
            return
        # Otherwise one send per BODY_CHUNK: a small message and its end
        # marker leave together, the last group with the next command group.
        tail = b""
        for group in gathered(pieces, BODY_CHUNK):
            if tail:
                self.writer.write(tail)
                if self.writer.transport.get_write_buffer_size() > BODY_CHUNK:
                    await self.writer.drain()
            tail = b"".join(group)
        self._body_tail = tail


def _lines(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Re-cut a byte stream at line ends (CRLF kept with its line)."""
    partial = b""
    for piece in pieces:
        lines = (partial + piece).split(b"\n")
        partial = lines.pop()
        for line in lines:
            yield line + b"\n"
    if partial:
        yield partial



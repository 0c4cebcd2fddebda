"""The queue manager's periodic pass: expiry, delay warnings, sending notices.

Once the bridge answered 250, the host MTA forgot the message; expiry and
the sender's notices are ours (Postfix's ``maximal_queue_lifetime``,
``delay_warning_time`` and bounce daemon).  Each pass:

1. expires messages held longer than ``max_hold``: their pending recipients
   fail with 4.4.7 and a non-delivery notice is queued;
2. queues one delay warning per message held longer than ``delay_warning``
   (when enabled);
3. sends every queued notice from ``bounce/`` to its sender with the null
   return path, through the host MTA (SMTP), and removes it once accepted
   or refused for good; a temporary failure keeps it for the next pass.

Expiry and warnings take the domain's lease, so they never race an ATRN
session; a domain being collected is simply visited on a later pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import smtplib
import time
from collections.abc import Awaitable, Callable

from odmr_bridge import bounce, metrics
from odmr_bridge.logs import seconds
from odmr_bridge.queue import DomainBusy, HoldQueue
from odmr_bridge.spool import Envelope

log = logging.getLogger("odmr_bridge.lifecycle")


@dataclasses.dataclass(frozen=True)
class LifecyclePolicy:
    max_hold: float  # seconds
    delay_warning: float  # seconds; 0: no delay warnings
    interval: float  # seconds between passes
    relay: tuple[str, int]  # the host MTA's SMTP service that takes our notices
    report: bounce.ReportSettings


@dataclasses.dataclass
class PassReport:
    expired: int = 0
    warned: int = 0
    sent: int = 0
    kept: int = 0


class NoticeRefused(Exception):
    """The host MTA refused a notice; ``permanent`` says whether to give up."""

    def __init__(self, reply: str, permanent: bool) -> None:
        super().__init__(reply)
        self.permanent = permanent


def _describe(code: int, text: bytes | str) -> str:
    message = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return f"{code} {message}".replace("\n", " ")


def send_notice(relay: tuple[str, int], helo: str, recipient: str, message: bytes) -> str:
    """Hand one notice to the host MTA with ``MAIL FROM:<>``; returns its reply.

    Raises NoticeRefused (permanent for 5xx) or OSError/SMTPException (temporary).
    """
    with smtplib.SMTP(relay[0], relay[1], local_hostname=helo, timeout=60) as smtp:
        smtp.ehlo_or_helo_if_needed()
        options = []
        if bounce.needs_8bit(message) and smtp.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        if not recipient.isascii():
            if not smtp.has_extn("smtputf8"):  # a UTF-8 address: it never will be
                raise NoticeRefused("the host MTA does not offer SMTPUTF8", permanent=True)
            options.append("SMTPUTF8")
        code, text = smtp.mail("", options)
        if code == 250:
            code, text = smtp.rcpt(recipient)
        if code in (250, 251):
            code, text = smtp.data(message)
        if code != 250:
            raise NoticeRefused(_describe(code, text), code >= 500)
        return _describe(code, text)


class Lifecycle:
    def __init__(self, queue: HoldQueue, policy: LifecyclePolicy) -> None:
        self.queue = queue
        self.policy = policy
        self._kick = asyncio.Event()

    def kick(self) -> None:
        """Run a pass soon (an ATRN session just ended: its bounces go out now)."""
        self._kick.set()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.run_pass()
            except Exception as exc:  # Redis away and the like: try again next time
                log.error("warning: queue pass failed: %s: %s", type(exc).__name__, exc)
            self._kick.clear()
            waiters = [asyncio.ensure_future(e.wait()) for e in (stopping, self._kick)]
            await asyncio.wait(waiters, timeout=self.policy.interval,
                               return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    async def run_pass(self, now: float | None = None) -> PassReport:
        when = time.time() if now is None else now
        report = PassReport()
        # Only domains whose oldest message is due for something are visited.
        ages = [self.policy.max_hold] + ([self.policy.delay_warning]
                                         if self.policy.delay_warning > 0 else [])
        for domain in await self.queue.due_domains(when - min(ages)):
            try:
                report.expired += await self._expire(domain, when)
                report.warned += await self._warn(domain, when)
            except DomainBusy:
                log.debug("%s: being collected; expiry and warnings wait", domain)
        await self.queue.sync()
        sent, kept = await self.send_notices(when)
        report.sent, report.kept = sent, kept
        return report

    # -- expiry and delay warnings ---------------------------------------------

    async def _visit(self, domain: str, due: list[str],
                     step: Callable[[Envelope], Awaitable[bool]]) -> int:
        """Run *step* on each due message still pending, under the domain's lease."""
        if not due:
            return 0
        done = 0
        async with self.queue.exclusive(domain) as lease:
            for qid in due:
                if lease.lost:
                    break
                async with self.queue.checkout(domain, qid) as found:
                    if found is not None and await step(found[0]):
                        done += 1
        return done

    async def _expire(self, domain: str, now: float) -> int:
        due = await self.queue.arrived_before(domain, now - self.policy.max_hold)

        async def expire(envelope: Envelope) -> bool:
            days = self.policy.max_hold / 86400
            held = seconds(now - envelope.arrival)
            for rcpt in envelope.pending():  # each line before the queue's "removed"
                metrics.RECIPIENTS.labels("expired").inc()
                log.info("%s: to=<%s>, relay=none, delay=%s, delays=0/%s/0/0, dsn=4.4.7, "
                         "status=expired, returned to sender", envelope.qid, rcpt.address,
                         held, held)
            await self.queue.expire(
                envelope, f"4.4.7 message expired: held {days:g} days and not collected")
            return True

        return await self._visit(domain, due, expire)

    async def _warn(self, domain: str, now: float) -> int:
        if self.policy.delay_warning <= 0:
            return 0
        due = await self.queue.arrived_before(domain, now - self.policy.delay_warning)
        return await self._visit(domain, await self.queue.unwarned(domain, due),
                                 self.queue.warn)

    # -- sending notices ---------------------------------------------------------

    async def send_notices(self, now: float) -> tuple[int, int]:
        """Send what waits in bounce/; returns (sent or given up, kept for later)."""
        done = kept = 0
        for waiting in await self.queue.waiting_notices():
            qid = waiting.qid
            try:
                async with self.queue.open_notice(waiting) as opened:
                    if opened is None:  # sent meanwhile, or corrupt (quarantined)
                        continue
                    body, notice = opened
                    message = bounce.build(notice, body, self.policy.report, now)
            except Exception as exc:  # a bug must not stop the other notices
                log.error("%s: cannot build notice, kept for the next pass: %s: %s", qid,
                          type(exc).__name__, exc)
                kept += 1
                continue
            if await self._deliver(qid, notice, message, now):
                await self.queue.remove_notice(notice)
                done += 1
            else:
                kept += 1
        return done, kept

    async def _deliver(self, qid: str, notice: Envelope, message: bytes, now: float) -> bool:
        """True when the notice is finished with (accepted, or refused for good)."""
        host, port = self.policy.relay
        where = f"{host}[{host}]:{port}"
        kind = bounce.ACTIONS[notice.recipients[0].state]
        try:
            reply = await asyncio.to_thread(send_notice, self.policy.relay,
                                            self.policy.report.reporting_mta, notice.sender,
                                            message)
        except NoticeRefused as exc:
            if exc.permanent:
                metrics.NOTICES.labels(kind, "bounced").inc()
                log.warning("%s: from=<>, to=<%s>, relay=%s, status=bounced (%s notice for "
                            "%s refused; not retried: %s)", qid, notice.sender, where, kind,
                            notice.about, exc)
                return True
            reason = str(exc)
        except (TimeoutError, OSError, smtplib.SMTPException) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # unforeseen: keep it, and keep sending the others
            log.error("%s: sending the notice failed: %s: %s", qid, type(exc).__name__, exc)
            reason = f"{type(exc).__name__}: {exc}"
        else:
            metrics.NOTICES.labels(kind, "sent").inc()
            log.info("%s: from=<>, to=<%s>, relay=%s, status=sent (%s notice for %s: %s)",
                     qid, notice.sender, where, kind, notice.about, reply)
            return True
        if now - notice.arrival > 2 * self.policy.max_hold:
            metrics.NOTICES.labels(kind, "expired").inc()
            log.warning("%s: from=<>, to=<%s>, relay=%s, status=expired (%s notice for %s "
                        "given up: %s)", qid, notice.sender, where, kind, notice.about, reason)
            return True
        metrics.NOTICES.labels(kind, "deferred").inc()
        log.info("%s: from=<>, to=<%s>, relay=%s, status=deferred (%s notice for %s: %s)",
                 qid, notice.sender, where, kind, notice.about, reason)
        return False

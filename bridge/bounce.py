"""Delivery status notifications (RFC 3464) for the sender of a held message.

A notice in ``bounce/`` is a queue file whose recipients are the ones to
report, each in the state that says what happened: ``failed`` (a bounce),
``pending`` (a delay warning) or ``delivered`` (relayed to a customer MTA
that cannot itself honour NOTIFY=SUCCESS).  :func:`build` turns it into a
``multipart/report`` message built with the standard ``email`` package: a
human-readable part, the ``message/delivery-status`` part, and the original
message (failures, RET=FULL or no RET, up to a size limit) or its headers.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from email import message_from_bytes
from email.generator import BytesGenerator
from email.message import Message
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import format_datetime, formatdate, make_msgid
from io import BytesIO

from odmr_bridge.dsn import parameter, xtext_decode
from odmr_bridge.spool import DELIVERED, FAILED, PENDING, Envelope, Readable, Recipient

# Byte-faithful for the original (compat32 keeps its headers as they came), CRLF on the wire.
_POLICY = compat32.clone(linesep="\r\n")
_REPLY = re.compile(r"^(?P<code>[245]\d\d)[ -](?:(?P<status>[245]\.\d{1,3}\.\d{1,3})\b)?")
_LOCAL = re.compile(r"^(?P<status>[245]\.\d{1,3}\.\d{1,3})\b")

ACTIONS = {FAILED: "failed", PENDING: "delayed", DELIVERED: "relayed"}
_SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    PENDING: "Delayed Mail (still being held)",
    DELIVERED: "Successful Mail Delivery Report",
}
_INTROS = {
    FAILED: "I'm sorry to have to inform you that your message could not\n"
            "be delivered to one or more recipients.",
    PENDING: "This is a warning only; you do not need to resend your message.\n\n"
             "Your message could not yet be delivered to one or more recipients:\n"
             "their mail is held until the recipient's mail server collects it\n"
             "(On-Demand Mail Relay). Delivery will be attempted until {until}.",
    DELIVERED: "Your message was successfully relayed to the recipient's mail server,\n"
               "which does not return delivery notifications itself.",
}
# Held and never collected: the customer's host has not connected (RFC 3463 X.4.1).
_WAITING = "4.4.1 waiting for the customer's mail server to collect the message (ATRN)"


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    reporting_mta: str
    max_hold: float  # seconds a message may be held (for Will-Retry-Until)
    size_limit: int  # originals larger than this are returned as headers only


def status_of(state: str, reason: str) -> tuple[str, str | None]:
    """(Status, Diagnostic-Code or None) for a recipient's state and last reason."""
    default = {FAILED: "5.0.0", PENDING: "4.0.0", DELIVERED: "2.0.0"}[state]
    if match := _REPLY.match(reason):
        status = match["status"] or default
        return status if status[0] == match["code"][0] else default, f"smtp; {reason}"
    if match := _LOCAL.match(reason):
        return match["status"], None
    return default, None


def _reason(rcpt: Recipient) -> str:
    """The recipient's last reply; for a delay never tried, that it waits for its customer."""
    return rcpt.reason or (_WAITING if rcpt.state == PENDING else "")


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, UTC).astimezone())


def _fields(pairs: list[tuple[str, str]]) -> Message:
    block = Message(policy=_POLICY)
    for name, value in pairs:
        block[name] = value
    return block


def _delivery_status(notice: Envelope, settings: ReportSettings, now: float) -> Message:
    per_message = [("Reporting-MTA", f"dns; {settings.reporting_mta}"),
                   ("X-ODMR-Bridge-Queue-ID", notice.about or notice.qid)]
    if envid := parameter(notice.mail_options, "ENVID"):
        per_message.append(("Original-Envelope-Id", xtext_decode(envid)))
    per_message.append(("Arrival-Date", _date(notice.arrival)))
    blocks: list[Message | str] = [_fields(per_message)]
    for rcpt in notice.recipients:
        status, diagnostic = status_of(rcpt.state, _reason(rcpt))
        fields = []
        if orcpt := parameter(rcpt.options, "ORCPT"):
            kind, _, address = orcpt.partition(";")
            fields.append(("Original-Recipient", f"{kind}; {xtext_decode(address)}"))
        fields += [("Final-Recipient", f"rfc822; {rcpt.address}"),
                   ("Action", ACTIONS[rcpt.state]), ("Status", status)]
        if diagnostic:
            fields.append(("Diagnostic-Code", diagnostic))
        fields.append(("Last-Attempt-Date", _date(now)))
        if rcpt.state == PENDING:
            fields.append(("Will-Retry-Until", _date(notice.arrival + settings.max_hold)))
        blocks.append(_fields(fields))
    part = Message(policy=_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    part.set_payload(blocks)
    return part


def _human_text(notice: Envelope, settings: ReportSettings) -> str:
    state = notice.recipients[0].state
    until = _date(notice.arrival + settings.max_hold)
    lines = [
        f"This is the mail system at host {settings.reporting_mta}.",
        "",
        _INTROS[state].format(until=until),
        "",
        f"Queue ID: {notice.about or notice.qid}",
        "",
    ]
    for rcpt in notice.recipients:
        reason = _reason(rcpt)
        lines.append(f"<{rcpt.address}>: {reason}" if reason else f"<{rcpt.address}>")
    return "\n".join(lines) + "\n"


def _headers_only(original: bytes) -> bytes:
    end = original.find(b"\r\n\r\n")
    return original if end < 0 else original[:end + 2]


def _returned(notice: Envelope, original: bytes, settings: ReportSettings) -> Message:
    """The original (message/rfc822) or, by RET=HDRS, size or kind of notice, its headers."""
    ret = parameter(notice.mail_options, "RET")
    full = (notice.recipients[0].state == FAILED and ret != "HDRS"
            and len(original) <= settings.size_limit)
    if full:
        part: Message = MIMEMessage(message_from_bytes(original, policy=_POLICY), "rfc822",
                                    policy=_POLICY)
        part["Content-Description"] = "Undelivered Message"
    else:
        part = Message(policy=_POLICY)
        part["Content-Type"] = "text/rfc822-headers"
        part["Content-Description"] = "Message Headers"
        part.set_payload(_headers_only(original).decode("ascii", "surrogateescape"))
    if needs_8bit(original if full else _headers_only(original)):
        part["Content-Transfer-Encoding"] = "8bit"
    return part


def build(notice: Envelope, body: Readable, settings: ReportSettings, now: float) -> bytes:
    """The complete notification message, CRLF line ends, ready for SMTP."""
    state = notice.recipients[0].state
    report: MIMEMultipart = MIMEMultipart("report", policy=_POLICY)
    report.set_param("report-type", "delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{settings.reporting_mta}>"
    report["To"] = notice.sender
    report["Subject"] = _SUBJECTS[state]
    report["Date"] = formatdate(now, localtime=True)
    report["Message-ID"] = make_msgid(domain=settings.reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    report.preamble = "This is a MIME-encapsulated message."
    report.attach(MIMEText(_human_text(notice, settings), "plain", policy=_POLICY))
    report.attach(_delivery_status(notice, settings, now))
    report.attach(_returned(notice, body.read(), settings))
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(report)
    return out.getvalue()


def needs_8bit(message: bytes) -> bool:
    return not message.isascii()

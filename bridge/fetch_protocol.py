"""Pure pieces of the reversed session of ``odmr-bridge fetch`` (no sockets).

After ``ATRN`` the customer is the SMTP server: these parse what the provider
sends (command lines, then a DATA body) and build what we answer (EHLO from
what the local MTA offers, one DATA reply from LMTP's per-recipient ones).
"""

from __future__ import annotations

from collections.abc import Iterable

from odmr_bridge.smtp_client import Extensions, ProtocolError, Reply

# What we offer the provider, each only if the local MTA offers it too.
FORWARDED_EXTENSIONS = ("PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "DSN",
                        "ENHANCEDSTATUSCODES")
MAX_COMMAND_LINE = 4096
MAX_BODY_LINE = 1 << 20

# Our own replies in the reversed session (the rest are the local MTA's).
GREETING = "220 {hostname} ESMTP odmr-bridge fetch"
BYE = "221 2.0.0 Bye"
HELO_OK = "250 {hostname}"
NOT_IMPLEMENTED = "502 5.5.1 Error: command not implemented"
LINE_TOO_LONG = "500 5.5.6 Error: command line too long"
LOCAL_LOST = "421 4.4.2 {hostname} local MTA connection lost, closing"
PARTIAL_DELIVERY = ("451 4.3.0 local MTA accepted {accepted} of {total} recipients after DATA; "
                    "send again later (the {accepted} will get a second copy)")


def format_reply(reply: Reply) -> bytes:
    """A reply as wire lines, multi-line replies kept."""
    lines = reply.lines or ("",)
    out = [f"{reply.code}-{line}" for line in lines[:-1]] + [f"{reply.code} {lines[-1]}"]
    return "".join(f"{line.rstrip()}\r\n" for line in out).encode("utf-8")


def ehlo_reply(hostname: str, local: Extensions) -> Reply:
    """Our EHLO reply: the extensions of :data:`FORWARDED_EXTENSIONS` the local MTA has."""
    lines = [hostname]
    for name in FORWARDED_EXTENSIONS:
        if name in local:
            params = local.names[name]
            lines.append(f"{name} {params}".rstrip() if name == "SIZE" else name)
    return Reply(250, tuple(lines))


def combine_data_replies(replies: list[Reply]) -> Reply:
    """LMTP's per-recipient DATA replies as the one reply the provider gets.

    Nothing is acknowledged that the local MTA did not accept:
    * every recipient accepted: the first 2xx;
    * none accepted: a 4xx if any (try again), else the first 5xx (bounce);
    * some accepted, some not: 451, so the provider keeps the message; the
      accepted recipients get it twice on the next collection.  A 250 would
      lose the refused ones; a 5xx would bounce mail that was delivered.
    """
    if not replies:
        raise ValueError("no replies")
    accepted = [r for r in replies if r.kind == 2]
    if len(accepted) == len(replies):
        return accepted[0]
    if not accepted:
        temporary = [r for r in replies if r.kind == 4]
        return (temporary or replies)[0]
    return Reply(451, (PARTIAL_DELIVERY[4:].format(accepted=len(accepted),
                                                   total=len(replies)),))


class CommandReader:
    """Bytes from the provider -> command lines (CRLF or a bare LF ends one)."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_COMMAND_LINE and b"\n" not in self.buffer:
            raise ProtocolError("command line too long")

    def lines(self) -> Iterable[str]:
        """Complete lines so far, without their line ends, decoded as UTF-8."""
        while (end := self.buffer.find(b"\n")) >= 0:
            raw, self.buffer = self.buffer[:end], self.buffer[end + 1:]
            yield raw.rstrip(b"\r").decode("utf-8", "surrogateescape")

    def take_rest(self) -> bytes:
        """What is buffered after the last line taken (the start of a body)."""
        rest, self.buffer = self.buffer, b""
        return rest


def verb_of(line: str) -> str:
    return line.split(" ", 1)[0].upper()


class DataReader:
    """A dot-stuffed DATA body -> bytes for the local MTA, up to the ``.`` line.

    The body passes on still dot-stuffed, so it is never decoded.  Only
    ``CRLF . CRLF`` ends it.  A bare CR or LF becomes CRLF, and a line that
    begins after such a new line end is stuffed if it starts with ``.``:
    a local MTA that would take a bare LF for a line end never sees a
    smuggled end of DATA (CVE-2023-51764 class).
    """

    def __init__(self) -> None:
        self.partial = b""
        self.line_start = True  # the next byte starts a line after a real CRLF
        self.done = False
        self.rest = b""  # bytes after the end of DATA (pipelined commands)

    def feed(self, data: bytes) -> bytes:
        """The next piece to forward; sets ``done`` and ``rest`` at the end."""
        if self.done:
            raise ValueError("body already complete")
        buf = self.partial + data
        cut = buf.rfind(b"\n") + 1
        complete, self.partial = buf[:cut], buf[cut:]
        if len(self.partial) > MAX_BODY_LINE:
            raise ProtocolError("body line too long")
        if not complete:
            return b""
        lines = complete.count(b"\n")
        if complete.count(b"\r") == lines and complete.count(b"\r\n") == lines:
            return self._clean(complete)
        return self._mend(complete)

    def _finish(self, rest: bytes) -> None:
        self.done = True
        self.rest = rest + self.partial
        self.partial = b""

    def _clean(self, complete: bytes) -> bytes:
        """CRLF-only lines: find the end by search, forward as is."""
        if self.line_start and complete.startswith(b".\r\n"):
            self._finish(complete[3:])
            return b""
        end = complete.find(b"\r\n.\r\n")
        if end >= 0:
            self._finish(complete[end + 5:])
            return complete[:end + 2]
        self.line_start = True
        return complete

    def _mend(self, complete: bytes) -> bytes:
        """Line by line, making every line end CRLF."""
        out: list[bytes] = []
        lines = complete.split(b"\n")
        lines.pop()  # empty: complete ends with LF
        for number, line in enumerate(lines):
            crlf = line.endswith(b"\r")
            pieces = (line[:-1] if crlf else line).split(b"\r")
            if crlf and self.line_start and pieces == [b"."]:
                self._finish(b"".join(x + b"\n" for x in lines[number + 1:]))
                return b"".join(out)
            for index, piece in enumerate(pieces):
                real_start = self.line_start if index == 0 else False
                # A new line start, or a lone "." that is not the end: one more dot,
                # so no line we forward is ever a lone "." before the end.
                if (not real_start and piece.startswith(b".")) or piece == b".":
                    piece = b"." + piece
                out.append(piece + b"\r\n")
            self.line_start = crlf
        return b"".join(out)

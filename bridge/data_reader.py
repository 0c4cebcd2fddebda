"""Reading an LMTP/SMTP DATA section from a stream, as it arrives, into a sink.

aiosmtpd reads DATA one line at a time, the costliest step of an intake, and
keeps the whole message in memory.  Here each read ends at the next
``.<CRLF>`` (or at the stream's buffer limit), which for ordinary mail is a
handful of reads per message, and each piece goes to the sink at once (a
spooled temporary file: memory for small mail, disk past a megabyte), so a
50 MB message never needs 50 MB of memory.

On the way the content is made what the spool keeps: dot-stuffing undone
(RFC 5321 4.5.2), then every bare CR or LF turned into CRLF, as Postfix
stores mail, so that no later reader can take one for the end of DATA (SMTP
smuggling).  The terminator is the first ``.<CRLF>`` that starts a line
(after a CRLF: a bare LF or CR never ends a line here).
"""

from __future__ import annotations

import asyncio
from typing import IO

from odmr_bridge import replies
from odmr_bridge.smtp_client import CrlfLineEnds

_DOT_LINE_END = b".\r\n"


class _LineLengths:
    """Whether any CRLF-delimited line of a stream, fed piece by piece, is too long."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.current = 0  # bytes of the line in progress (a trailing CR included)
        self._ends_in_cr = False
        self.too_long = False

    def feed(self, piece: bytes) -> None:
        if self.current and piece[:1] == b"\n" and self._ends_in_cr:
            self._line(self.current - 1)  # a CRLF split across two pieces
            self.current = 0
            piece = piece[1:]
        last = piece.rfind(b"\r\n")
        if last < 0:
            self.current += len(piece)
        else:
            if self.current + last > self.max_length:  # else no line here can be
                lines = piece[:last].split(b"\r\n")
                self._line(self.current + len(lines[0]))
                for line in lines[1:]:
                    self._line(len(line))
            self.current = len(piece) - last - 2
        self._ends_in_cr = piece[-1:] == b"\r"
        if self.current - self._ends_in_cr > self.max_length:
            self.too_long = True

    def _line(self, length: int) -> None:
        if length > self.max_length:
            self.too_long = True


class _Unstuffer:
    """Undoes dot-stuffing in a CRLF stream fed piece by piece."""

    def __init__(self) -> None:
        self.tail = b"\r\n"  # the start of the data counts as a line start

    def feed(self, piece: bytes) -> bytes:
        # The replacement only ever removes a dot after the tail's bytes.
        joined = self.tail + piece
        out = joined.replace(b"\r\n.", b"\r\n")[len(self.tail):]
        self.tail = joined[-2:]
        return out


async def read_message(reader: asyncio.StreamReader, sink: IO[bytes], size_limit: int | None,
                       line_limit: int) -> str | None:
    """Read DATA up to the lone dot into *sink*; None, or the error reply.

    A message over *size_limit*, or with a line longer than *line_limit*
    (CRLF included), is read to its end and the error reply returned (what
    the sink holds then is to be thrown away).
    """
    size = 0
    lines = _LineLengths(line_limit - 2)
    unstuff = _Unstuffer()
    line_ends = CrlfLineEnds()
    writing = True
    tail = b"\r\n"
    while True:
        try:
            piece = await reader.readuntil(_DOT_LINE_END)
            before = piece[-5:-3] if len(piece) >= 5 else (tail + piece)[-5:-3]
            ended = before == b"\r\n"
        except asyncio.LimitOverrunError as exc:
            # More than the buffer limit before the next ".<CRLF>": take what
            # is safe to take (never a partial terminator) and look again.
            piece = await reader.read(exc.consumed)
            ended = False
        if not piece:  # end of stream inside DATA
            raise asyncio.IncompleteReadError(b"", None)
        size += len(piece)
        tail = (tail + piece)[-2:]
        content = piece[:-3] if ended else piece
        if writing:
            lines.feed(content)
            if (size_limit and size > size_limit) or lines.too_long:
                writing = False
            else:
                sink.write(line_ends.feed(unstuff.feed(content)))
        if ended:
            break
    if size_limit and size > size_limit:
        return replies.MESSAGE_TOO_BIG
    if lines.too_long:
        return replies.DATA_LINE_TOO_LONG
    sink.write(line_ends.end())
    return None

"""A minimal ESMTP client over an existing stream (the reversed ODMR session).

After ``ATRN`` the TCP connection the customer opened carries SMTP the other
way round, so no library client can be pointed at it: this module speaks the
client side of RFC 5321 on an ``asyncio`` reader/writer pair.  Pure helpers
(reply parsing, dot-stuffing) are separate so they are tested without sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Iterable, Iterator

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
MAX_REPLY_LINES = 100


def is_enhanced_code(token: str) -> bool:
    """``5.1.1`` and the like (RFC 3463 class.subject.detail)."""
    return bool(_ENHANCED.match(token))


class ProtocolError(Exception):
    """The peer broke the SMTP reply syntax; the session cannot go on."""


@dataclasses.dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def kind(self) -> int:
        return self.code // 100

    @property
    def dsn(self) -> str:
        """The enhanced status code (RFC 3463), or one derived from the reply class."""
        first = self.lines[0].split(" ", 1)[0] if self.lines else ""
        if is_enhanced_code(first) and first[0] == str(self.kind):
            return first
        return f"{self.kind}.0.0"

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


def parse_reply_line(raw: bytes) -> tuple[int, bool, str]:
    """``b"250-PIPELINING\\r\\n"`` -> (250, more_follows, "PIPELINING")."""
    line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
    if len(line) < 3 or not line[:3].isdigit() or line[0] not in "12345":
        raise ProtocolError(f"bad reply line {line[:80]!r}")
    if len(line) > 3 and line[3] not in " -":
        raise ProtocolError(f"bad reply line {line[:80]!r}")
    return int(line[:3]), line[3:4] == "-", line[4:]


async def read_reply(reader: asyncio.StreamReader, timeout: float) -> Reply:
    lines: list[str] = []
    code = 0
    async with asyncio.timeout(timeout):
        while True:
            try:
                raw = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                raise ConnectionResetError("connection closed by customer") from exc
            except asyncio.LimitOverrunError as exc:
                raise ProtocolError("reply line too long") from exc
            this_code, more, text = parse_reply_line(raw)
            if code and this_code != code:
                raise ProtocolError("multi-line reply changed its code")
            code = this_code
            lines.append(text)
            if not more:
                return Reply(code, tuple(lines))
            if len(lines) > MAX_REPLY_LINES:
                raise ProtocolError("reply has too many lines")


_LINE_END = re.compile(rb"\r\n|\r|\n")


class CrlfLineEnds:
    """Every line end as CRLF: a bare CR or a bare LF becomes CRLF, piece by piece.

    The defence against SMTP smuggling (CVE-2023-51764 and kin): a receiver
    that takes a bare LF (or CR) for a line end would otherwise see a
    ``<LF>.<CRLF>`` inside the content as the end of DATA and whatever follows
    as new commands.  A CR at the end of a piece waits for the next one, so a
    CRLF split across pieces stays one line end.  Content that is already
    all CRLF (all ordinary mail) passes through without a copy.
    """

    def __init__(self) -> None:
        self.carry = b""

    def feed(self, chunk: bytes) -> bytes:
        if self.carry:
            chunk, self.carry = self.carry + chunk, b""
        if chunk.endswith(b"\r"):
            chunk, self.carry = chunk[:-1], b"\r"
        lines = chunk.count(b"\n")
        if chunk.count(b"\r") != lines or chunk.count(b"\r\n") != lines:
            chunk = _LINE_END.sub(b"\r\n", chunk)
        return chunk

    def end(self) -> bytes:
        """What a last, lone CR stands for."""
        return b"\r\n" if self.carry else b""


def crlf_line_ends(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """:class:`CrlfLineEnds` over an iterable of chunks."""
    normaliser = CrlfLineEnds()
    for chunk in chunks:
        if out := normaliser.feed(chunk):
            yield out
    if out := normaliser.end():
        yield out


def dot_stuff(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Transparency (RFC 5321 4.5.2) for a CRLF body, chunk by chunk, plus the end.

    Every line that starts with "." gets a second "."; a body not ending in
    CRLF gets one; then the terminating ".\\r\\n".
    """
    # The last two bytes sent; the body starts at a line start, as after CRLF.
    tail = b"\r\n"
    for chunk in chunks:
        if not chunk:
            continue
        # Stuff with the previous tail in front, so a CRLF split across chunks
        # is seen; the replacement only ever inserts after the tail's bytes.
        joined = tail + chunk
        yield joined.replace(b"\r\n.", b"\r\n..")[len(tail):]
        tail = joined[-2:]
    yield b".\r\n" if tail == b"\r\n" else b"\r\n.\r\n"


@dataclasses.dataclass
class Extensions:
    """What the server's EHLO reply offers."""

    names: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Extensions:
        names: dict[str, str] = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.partition(" ")
            names[keyword.upper()] = params
        return cls(names)

    def __contains__(self, name: str) -> bool:
        return name.upper() in self.names

    def limit(self, name: str) -> int | None:
        """A positive limit the server announces with LIMITS (RFC 9422), e.g. MAILMAX."""
        for item in self.names.get("LIMITS", "").split():
            key, _, value = item.partition("=")
            if key.upper() == name and value.isdigit() and int(value) > 0:
                return int(value)
        return None

    def size_limit(self) -> int | None:
        value = self.names.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

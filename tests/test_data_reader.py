"""Reading DATA (RFC 5321 4.5.2): the lone dot ends it, dot-stuffing is undone,
and nothing after the terminator is consumed.  Pure: a StreamReader fed bytes."""

from __future__ import annotations

import asyncio
import io

from hypothesis import given, settings
from hypothesis import strategies as st

from odmr_bridge import replies
from odmr_bridge.data_reader import read_message

LIMIT = 1001  # aiosmtpd's line_length_limit, also the StreamReader's buffer limit


async def read(pieces: list[bytes], size_limit: int | None = None) -> tuple[bytes, str | None,
                                                                           bytes]:
    """Feed *pieces* as they would arrive; returns (content, error, what is left unread)."""
    reader = asyncio.StreamReader(limit=LIMIT)

    async def feed() -> None:
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    sink = io.BytesIO()
    error = await read_message(reader, sink, size_limit, LIMIT)
    await feeder
    return (sink.getvalue() if error is None else b""), error, await reader.read()


def stuffed(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


async def test_an_empty_message_is_just_the_dot() -> None:
    assert await read([b".\r\nQUIT\r\n"]) == (b"", None, b"QUIT\r\n")


async def test_dot_stuffing_is_undone_at_every_line_start() -> None:
    data = b"..first\r\nmid.\r\n..\r\n...three\r\nlast.\r\n.\r\n"
    content, error, rest = await read([data])
    assert (content, error, rest) == (b".first\r\nmid.\r\n.\r\n..three\r\nlast.\r\n", None, b"")


async def test_the_terminator_may_arrive_one_byte_at_a_time() -> None:
    data = b"a\r\nb.\r\n.\r\nMAIL FROM:<x@y>\r\n"
    assert await read([bytes([b]) for b in data]) == (b"a\r\nb.\r\n", None,
                                                     b"MAIL FROM:<x@y>\r\n")


async def test_a_message_far_larger_than_the_buffer_limit() -> None:
    lines = [b"line %06d " % i + b"x" * 60 for i in range(20_000)]  # ~1.4 MB
    content, error, _ = await read([stuffed(lines) + b".\r\n"])
    assert error is None and content == b"\r\n".join(lines) + b"\r\n"


async def test_over_the_size_limit_the_rest_is_read_and_refused() -> None:
    data = stuffed([b"y" * 70] * 100) + b".\r\nRSET\r\n"
    assert await read([data], size_limit=5000) == (b"", replies.MESSAGE_TOO_BIG, b"RSET\r\n")


async def test_a_line_over_1000_octets_is_refused() -> None:
    content, error, rest = await read([b"ok\r\n" + b"z" * 1000 + b"\r\n.\r\nNOOP\r\n"])
    assert (content, error, rest) == (b"", replies.DATA_LINE_TOO_LONG, b"NOOP\r\n")
    content, error, _ = await read([b"z" * 998 + b"\r\n.\r\n"])  # 1000 with CRLF: fine
    assert error is None and content == b"z" * 998 + b"\r\n"


lines = st.lists(st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                 max_size=40)


@settings(max_examples=300, deadline=None)
@given(lines, st.lists(st.integers(1, 700), min_size=1, max_size=20), st.binary(max_size=30))
def test_any_message_in_any_pieces_reads_back_exactly(body: list[bytes], cuts: list[int],
                                                      after: bytes) -> None:
    data = stuffed(body) + b".\r\n" + after
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(data[at:at + cut])
        at += cut
    pieces.append(data[at:])
    content, error, rest = asyncio.run(read([p for p in pieces if p]))
    assert error is None
    assert content == b"".join(line + b"\r\n" for line in body)
    assert rest == after

"""Pure parts of the reversed-session client: dot-stuffing and reply parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from odmr_bridge.smtp_client import Extensions, ProtocolError, Reply, dot_stuff, parse_reply_line


def unstuff(wire: bytes) -> bytes:
    """What a receiving SMTP server does (RFC 5321 4.5.2)."""
    assert wire.endswith(b".\r\n")
    lines = wire.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    body = [line[1:] if line.startswith(b".") else line for line in lines[:-2]]
    return b"".join(x + b"\r\n" for x in body)


lines = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"a.b", b"\xe9t\xe9", b"x\r", b"\n."]),
                 max_size=20)


@given(parts=lines, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_dot_stuffing_round_trips_whatever_the_chunking(parts: list[bytes],
                                                        cuts: list[int]) -> None:
    body = b"".join(p + b"\r\n" for p in parts)
    positions = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *positions], [*positions, len(body)], strict=True)]
    wire = b"".join(dot_stuff(chunks))
    assert unstuff(wire) == body
    assert b"".join(dot_stuff([body])) == wire


def test_leading_dot_and_dot_lines_are_doubled() -> None:
    assert b"".join(dot_stuff([b".a\r\n", b".\r\nb\r\n"])) == b"..a\r\n..\r\nb\r\n.\r\n"


def test_body_without_final_crlf_gets_one() -> None:
    assert b"".join(dot_stuff([b"abc"])) == b"abc\r\n.\r\n"
    assert b"".join(dot_stuff([])) == b".\r\n"


def test_reply_lines_parse_and_enhanced_codes_are_found() -> None:
    assert parse_reply_line(b"250-PIPELINING\r\n") == (250, True, "PIPELINING")
    assert parse_reply_line(b"221\r\n") == (221, False, "")
    assert Reply(550, ("5.1.1 no such user",)).dsn == "5.1.1"
    assert Reply(451, ("try later",)).dsn == "4.0.0"
    assert Reply(250, ("5.1.1 mismatched class",)).dsn == "2.0.0"
    for bad in (b"hello\r\n", b"25\r\n", b"250x\r\n", b"650 odd\r\n"):
        with pytest.raises(ProtocolError):
            parse_reply_line(bad)


def test_ehlo_extensions_are_read_case_insensitively() -> None:
    ext = Extensions.from_ehlo(Reply(250, ("mx", "pipelining", "SIZE 1000", "8BITMIME")))
    assert "PIPELINING" in ext and "8bitmime" in ext and "DSN" not in ext
    assert ext.size_limit() == 1000

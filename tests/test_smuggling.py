"""SMTP smuggling: bare CR and bare LF in content never reach a customer as a line end.

A receiver that takes a bare LF for a line end (Postfix, Exim and Sendmail
did, before CVE-2023-51764/51765/51766) would see ``<LF>.<CRLF>`` inside a
message as the end of DATA, and the lines after it as new transactions.
Intake stores every line end as CRLF; the relay makes sure of it again for
mail an older version stored.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from odmr_bridge.smtp_client import crlf_line_ends
from tests.conftest import CUSTOMER
from tests.peers import Bridge, hold_on_spool
from tests.wire import CustomerMta, Wire

# Three smuggled transactions behind the three end-of-data look-alikes of the
# CVEs, and a bare CR for good measure.
SMUGGLING_BODY = (
    b"Subject: innocent\r\n\r\nhello\n.\r\n"
    b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@atrn.example>\r\nDATA\r\nevil one\r\n.\n"
    b"MAIL FROM:<evil2@x>\r\nRCPT TO:<victim@atrn.example>\r\nDATA\r\nevil two\n.\n"
    b"MAIL FROM:<evil3@x>\r\nRCPT TO:<victim@atrn.example>\r\nDATA\r\nevil three\r.\r\n"
    b"the end\r\n"
)
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def lmtp_raw(port: int, rcpt: str, content: bytes) -> int:
    """One LMTP transaction whose DATA bytes go out exactly as given."""
    w = Wire(port)
    try:
        w.lmtp_to_data(rcpt)
        w.sock.sendall(content + b".\r\n")  # content ends in CRLF
        return w.reply()[0]
    finally:
        w.close()


def collect_tolerantly(bridge: Bridge, traced: bool = True) -> CustomerMta:
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    mta = CustomerMta(w, bare_lf_ends_lines=True, traced=traced)
    mta.run()
    return mta


@given(st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"x", b"\r")), max_size=8))
def test_line_ends_become_crlf_whatever_the_chunking(chunks: list[bytes]) -> None:
    whole = b"".join(chunks)
    out = b"".join(crlf_line_ends(chunks))
    assert out == b"".join(crlf_line_ends([whole]))
    assert BARE.search(out) is None
    assert out.replace(b"\r\n", b"") == whole.replace(b"\r\n", b"").replace(
        b"\r", b"").replace(b"\n", b"")


def test_crlf_content_passes_unchanged() -> None:
    body = b"Subject: s\r\n\r\n.line\r\nend\r\n"
    assert b"".join(crlf_line_ends([body[:15], body[15:16], body[16:]])) == body


def test_smuggled_commands_stay_inside_the_one_message(bridge: Bridge) -> None:
    assert lmtp_raw(bridge.lmtp_port, "a@atrn.example", SMUGGLING_BODY) == 250
    mta = collect_tolerantly(bridge)
    mails = [c.split(" SIZE=")[0] for c in mta.commands if c.startswith("MAIL")]
    assert mails == ["MAIL FROM:<s@x.test>"]
    assert len(mta.messages) == 1
    data = mta.messages[0][2]
    for command in (b"MAIL FROM:<evil@x>", b"MAIL FROM:<evil2@x>", b"MAIL FROM:<evil3@x>"):
        assert command + b"\r\n" in data
    assert data.endswith(b"the end\r\n")
    assert BARE.search(data) is None


def test_a_spool_written_before_the_fix_is_relayed_with_crlf_only(tmp_path: Path,
                                                                  redis_url: str) -> None:
    hold_on_spool(tmp_path / "b", SMUGGLING_BODY)
    b = Bridge(tmp_path / "b", redis_url)
    b.add_domain("atrn.example", *CUSTOMER)
    b.start()
    try:
        mta = collect_tolerantly(b, traced=False)  # written without the intake
        assert len([c for c in mta.commands if c.startswith("MAIL")]) == 1
        assert len(mta.messages) == 1
        assert b"MAIL FROM:<evil2@x>\r\n" in mta.messages[0][2]
        assert BARE.search(mta.messages[0][2]) is None
    finally:
        b.stop()

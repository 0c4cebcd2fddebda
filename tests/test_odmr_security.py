"""ODMR on the open internet: TLS, SASL mechanisms, throttling, command limits.

Raw-socket conformance against a bridge with a certificate, a TLS-on-connect
listener and a tight AUTH throttle; plus fetchmail over TLS.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import scramp

from odmr_bridge.accounts import AccountsFile
from tests.conftest import CUSTOMER, need
from tests.peers import Bridge, fetchmail, free_port, self_signed_certificate, smtp_sink, wait_for
from tests.wire import CustomerMta, Wire, lmtp_send

BODY = b"Subject: t\r\n\r\nhello over TLS\r\n"


def make_bridge(tmp_path: Path, redis_url: str, **env: str) -> Bridge:
    cert, key = self_signed_certificate(tmp_path / "tls")
    b = Bridge(tmp_path / "bridge", redis_url, extra_env={
        "ODMR_BRIDGE_TLS_CERT_FILE": str(cert), "ODMR_BRIDGE_TLS_KEY_FILE": str(key),
        "ODMR_BRIDGE_ODMR_TLS_LISTEN": f"127.0.0.1:{free_port()}",
        "ODMR_BRIDGE_AUTH_MAX_FAILURES": "2", "ODMR_BRIDGE_AUTH_FAILURE_DELAY": "0.2",
        "ODMR_BRIDGE_ODMR_MAX_BAD_COMMANDS": "5", **env,
    })
    store = AccountsFile(b.accounts)
    store.add_domain("atrn.example", [CUSTOMER[0]], {CUSTOMER[0]: CUSTOMER[1].encode()})
    store.add_domain("second.example", [CUSTOMER[0], "other"], {"other": b"other-pass"})
    b.start()
    return b


@pytest.fixture
def secure_bridge(tmp_path: Path, redis_url: str) -> Iterator[Bridge]:
    b = make_bridge(tmp_path, redis_url)
    yield b
    b.stop()


def tls_port(bridge: Bridge) -> int:
    return int(bridge.env["ODMR_BRIDGE_ODMR_TLS_LISTEN"].rsplit(":", 1)[1])


def ehlo(w: Wire) -> list[str]:
    code, lines = w.command("EHLO customer")
    assert code == 250
    return lines


def mechanisms(lines: list[str]) -> list[str]:
    [auth] = [line for line in lines if line.startswith("AUTH ")]
    return auth.split()[1:]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- TLS -------------------------------------------------------------------------

def test_starttls_is_offered_and_plain_login_only_appear_under_tls(secure_bridge: Bridge) -> None:
    w = Wire(secure_bridge.odmr_port)
    w.reply()
    clear = ehlo(w)
    assert "STARTTLS" in clear
    assert mechanisms(clear) == ["CRAM-MD5", "SCRAM-SHA-256"]
    assert w.command("AUTH PLAIN " + b64(b"\0cust\0x"))[0] == 538
    w.starttls()
    secured = ehlo(w)
    assert "STARTTLS" not in secured
    assert {"PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"} <= set(mechanisms(secured))
    assert w.command("STARTTLS")[0] == 503
    code, lines = w.command("AUTH PLAIN " + b64(f"\0{CUSTOMER[0]}\0{CUSTOMER[1]}".encode()))
    assert code == 235, lines


def test_reversal_keeps_the_tls_session(secure_bridge: Bridge) -> None:
    lmtp_send(secure_bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
    w = Wire(secure_bridge.odmr_port)
    w.reply()
    ehlo(w)
    w.starttls()
    ehlo(w)
    assert w.cram_md5(*CUSTOMER)[0] == 235
    assert w.command("ATRN atrn.example")[0] == 250
    mta = CustomerMta(w)
    assert [m[2] for m in mta.run()] == [BODY]  # read through the TLS socket
    assert secure_bridge.held() == []


def test_tls_on_connect_listener_serves_odmr(secure_bridge: Bridge) -> None:
    w = Wire(tls_port(secure_bridge), tls=True)
    assert w.reply()[0] == 220
    lines = ehlo(w)
    assert "STARTTLS" not in lines and "PLAIN" in mechanisms(lines)
    assert w.command("AUTH LOGIN")[0] == 334
    assert w.command(b64(CUSTOMER[0].encode()))[0] == 334
    assert w.command(b64(CUSTOMER[1].encode()))[0] == 235


def test_require_tls_refuses_auth_and_atrn_in_clear(tmp_path: Path, redis_url: str) -> None:
    b = make_bridge(tmp_path, redis_url, ODMR_BRIDGE_TLS_REQUIRE_TLS="yes")
    try:
        w = Wire(b.odmr_port)
        w.reply()
        ehlo(w)
        code, lines = w.command("AUTH CRAM-MD5")
        assert (code, lines[0][:5]) == (530, "5.7.0")
        assert w.command("ATRN atrn.example")[0] == 530
        w.starttls()
        ehlo(w)
        assert w.cram_md5(*CUSTOMER)[0] == 235
        assert w.command("ATRN atrn.example")[0] == 453
    finally:
        b.stop()


def test_a_renewed_certificate_is_used_without_restart(secure_bridge: Bridge,
                                                       tmp_path: Path) -> None:
    def served_subject() -> str:
        w = Wire(tls_port(secure_bridge), tls=True)
        der = w.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        w.close()
        return str(der)

    before = served_subject()
    new_cert, new_key = self_signed_certificate(tmp_path / "renewed", "renewed.test")
    cert = Path(secure_bridge.env["ODMR_BRIDGE_TLS_CERT_FILE"])
    key = Path(secure_bridge.env["ODMR_BRIDGE_TLS_KEY_FILE"])
    key.write_bytes(new_key.read_bytes())
    cert.write_bytes(new_cert.read_bytes())
    wait_for(lambda: served_subject() != before, timeout=5, interval=0.1,
             what="the new certificate")


# -- SASL ------------------------------------------------------------------------

def scram_login(w: Wire, user: str, password: str) -> tuple[int, list[str]]:
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    code, lines = w.command("AUTH SCRAM-SHA-256 " + b64(client.get_client_first().encode()))
    assert code == 334, lines
    client.set_server_first(base64.b64decode(lines[0]).decode())
    code, lines = w.command(b64(client.get_client_final().encode()))
    if code != 334:
        return code, lines
    client.set_server_final(base64.b64decode(lines[0]).decode())  # verifies the server
    return w.command("")


def test_scram_sha_256_authenticates_both_ways(secure_bridge: Bridge) -> None:
    w = Wire(secure_bridge.odmr_port)
    w.reply()
    ehlo(w)
    assert scram_login(w, *CUSTOMER)[0] == 235
    assert w.command("ATRN atrn.example")[0] == 453


def test_scram_with_a_wrong_password_is_535(secure_bridge: Bridge) -> None:
    w = Wire(secure_bridge.odmr_port)
    w.reply()
    ehlo(w)
    assert scram_login(w, CUSTOMER[0], "wrong")[0] == 535


def test_star_aborts_an_exchange(secure_bridge: Bridge) -> None:
    w = Wire(secure_bridge.odmr_port)
    w.reply()
    ehlo(w)
    assert w.command("AUTH CRAM-MD5")[0] == 334
    assert w.command("*")[0] == 501
    assert w.cram_md5(*CUSTOMER)[0] == 235


def test_unknown_mechanism_and_bad_base64(secure_bridge: Bridge) -> None:
    w = Wire(secure_bridge.odmr_port)
    w.reply()
    ehlo(w)
    assert w.command("AUTH GSSAPI")[0] == 504
    assert w.command("AUTH SCRAM-SHA-256 %%%notbase64")[0] == 501
    assert w.command("auth cram-md5")[0] == 334  # mechanism names are case-insensitive


def test_failed_auth_is_throttled_per_address(secure_bridge: Bridge) -> None:
    w = Wire(secure_bridge.odmr_port)
    w.reply()
    ehlo(w)
    assert w.cram_md5(CUSTOMER[0], "wrong1")[0] == 535
    assert w.cram_md5(CUSTOMER[0], "wrong2")[0] == 535
    started = time.monotonic()
    code, lines = w.command("AUTH CRAM-MD5")
    assert (code, lines[0][:5]) == (454, "4.7.0")
    assert time.monotonic() - started >= 0.2
    # The counters are in Redis: a new connection from the same address is throttled too.
    again = Wire(secure_bridge.odmr_port)
    again.reply()
    ehlo(again)
    assert again.command("AUTH CRAM-MD5")[0] == 454


def test_failed_auth_is_throttled_per_user(secure_bridge: Bridge) -> None:
    for source in ("127.0.0.2", "127.0.0.3"):
        w = Wire(secure_bridge.odmr_port, source=source)
        w.reply()
        ehlo(w)
        assert w.cram_md5(CUSTOMER[0], "guess")[0] == 535
    fresh = Wire(secure_bridge.odmr_port, source="127.0.0.4")
    fresh.reply()
    ehlo(fresh)
    assert fresh.cram_md5(*CUSTOMER)[0] == 454  # right password, throttled user
    assert fresh.cram_md5("other", "other-pass")[0] == 235  # other users are not


def test_no_secret_reaches_the_log(secure_bridge: Bridge) -> None:
    w = Wire(secure_bridge.odmr_port)
    w.reply()
    ehlo(w)
    w.starttls()
    ehlo(w)
    blob = b64(f"\0{CUSTOMER[0]}\0{CUSTOMER[1]}".encode())
    assert w.command("AUTH PLAIN " + blob)[0] == 235
    log = secure_bridge.log_text()
    assert CUSTOMER[1] not in log and blob not in log
    assert "{CRAM-MD5}" not in log and "{SCRAM-SHA-256}" not in log


# -- the command layer ----------------------------------------------------------

def test_overlong_command_line_is_500_5_5_6(secure_bridge: Bridge) -> None:
    w = Wire(secure_bridge.odmr_port)
    w.reply()
    code, lines = w.command("EHLO " + "x" * 600)
    assert (code, lines[0][:5]) == (500, "5.5.6")
    assert w.command("NOOP")[0] == 250


def test_too_many_bad_commands_disconnect_with_421(secure_bridge: Bridge) -> None:
    w = Wire(secure_bridge.odmr_port)
    w.reply()
    codes = [w.command(f"BOGUS{i}")[0] for i in range(4)]
    assert codes == [500] * 4
    assert w.command("MAIL FROM:<a@b.c>")[0] == 502
    assert w.reply()[0] == 421
    assert w.read_line() == b""


def test_every_reply_before_reversal_has_an_enhanced_code(secure_bridge: Bridge) -> None:
    w = Wire(secure_bridge.odmr_port)
    w.reply()
    for line in ("ATRN x.example", "EHLO", "FOO", "RSET", "NOOP", "AUTH", "QUIT"):
        code, lines = w.command(line)
        assert lines[0].split(" ")[0].count(".") == 2, (line, code, lines)


# -- fetchmail over TLS ----------------------------------------------------------

def test_fetchmail_collects_over_tls_several_domains_in_one_atrn(secure_bridge: Bridge,
                                                                 tmp_path: Path) -> None:
    need("fetchmail")
    lmtp_send(secure_bridge.lmtp_port, "s@x.test", ["a@atrn.example"],
              b"Subject: one\r\n\r\n" + b"line of text\r\n" * 200)
    lmtp_send(secure_bridge.lmtp_port, "s@x.test", ["b@second.example"],
              b"Subject: two\r\n\r\n.dot\r\n")
    with smtp_sink() as (port, sink):
        result = fetchmail(tmp_path, tls_port(secure_bridge), *CUSTOMER,
                           ["atrn.example", "second.example"], port, ssl=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(m[1][0] for m in sink.messages) == ["a@atrn.example", "b@second.example"]
    assert secure_bridge.held() == []

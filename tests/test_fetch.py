"""``odmr-bridge fetch``, the customer side: pure parsing, then against real peers.

The provider is always our bridge (tests.peers.Bridge); the local MTA is a
real Postfix for the normal path and a scripted aiosmtpd server where the
test needs per-recipient answers.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from odmr_bridge import fetch, fetch_config
from odmr_bridge.accounts import AccountsFile
from odmr_bridge.fetch_config import FetchSettings, LocalMtaSettings
from odmr_bridge.fetch_protocol import DataReader, combine_data_replies, ehlo_reply
from odmr_bridge.smtp_client import Extensions, Reply
from tests.conftest import CUSTOMER, need
from tests.peers import ROOT, Bridge, Postfix, free_port, smtp_sink, wait_for
from tests.test_end_to_end import MESSAGES
from tests.wire import lmtp_send, without_our_trace

# -- pure parts -------------------------------------------------------------------


def read_all(pieces: list[bytes]) -> tuple[bytes, bytes]:
    reader = DataReader()
    out = b""
    for number, piece in enumerate(pieces):
        out += reader.feed(piece)
        if reader.done:
            return out, reader.rest + b"".join(pieces[number + 1:])
    raise AssertionError("no end of DATA")


def test_data_reader_forwards_a_stuffed_body_as_is_and_stops_at_the_dot_line() -> None:
    stream = b"Subject: x\r\n\r\n..dot\r\nend\r\n.\r\nMAIL FROM:<a@b>\r\n"
    for cut in range(1, len(stream)):  # every split into two reads
        out, rest = read_all([stream[:cut], stream[cut:]])
        assert out == b"Subject: x\r\n\r\n..dot\r\nend\r\n"
        assert rest == b"MAIL FROM:<a@b>\r\n"


def test_data_reader_empty_body() -> None:
    assert read_all([b".\r\nQUIT\r\n"]) == (b"", b"QUIT\r\n")


def test_data_reader_never_forwards_a_smuggled_end_of_data() -> None:
    # A bare LF before "." is not a line end for us; for a lenient local MTA it
    # would be: the line after it gets a second dot, every end becomes CRLF.
    stream = b"a\n.\nMAIL FROM:<evil@x>\r\nb\r.\r\nc\r\n.\r\n"
    out, rest = read_all([stream])
    assert rest == b""
    assert b"\r\n.\r\n" not in out and b"\n.\n" not in out
    lines = out.split(b"\r\n")
    assert b"\n" not in out.replace(b"\r\n", b"") and b"\r" not in out.replace(b"\r\n", b"")
    assert b".." in lines and b"MAIL FROM:<evil@x>" in lines


def test_lmtp_replies_acknowledge_only_what_the_local_mta_accepted() -> None:
    ok, later, gone = Reply(250, ("2.0.0 ok",)), Reply(452, ("4.2.2 full",)), \
        Reply(550, ("5.1.1 gone",))
    assert combine_data_replies([ok, ok]) == ok
    assert combine_data_replies([gone, later]) == later
    assert combine_data_replies([gone, gone]) == gone
    assert combine_data_replies([ok, gone]).code == 451
    assert combine_data_replies([later, ok]).code == 451


def test_ehlo_offers_only_what_the_local_mta_offers() -> None:
    local = Extensions.from_ehlo(Reply(250, ("mx", "PIPELINING", "SIZE 1000", "STARTTLS",
                                             "ENHANCEDSTATUSCODES", "CHUNKING")))
    assert ehlo_reply("cust.test", local).lines == ("cust.test", "PIPELINING", "SIZE 1000",
                                                    "ENHANCEDSTATUSCODES")


def test_mechanism_choice() -> None:
    choose = fetch.choose_mechanism
    assert choose(["CRAM-MD5", "SCRAM-SHA-256"], False) == "SCRAM-SHA-256"
    assert choose(["CRAM-MD5", "PLAIN"], True) == "CRAM-MD5"
    assert choose([], False) == "CRAM-MD5"
    assert choose(["PLAIN", "LOGIN"], False) is None
    assert choose(["PLAIN", "LOGIN"], True) == "PLAIN"


def test_config_file_then_flags_and_safe_defaults(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    toml = tmp_path / "fetch.toml"
    toml.write_text(f'[provider]\nhost = "mx.example"\nuser = "u"\n'
                    f'password_file = "{secret}"\ndomains = ["A.example"]\n'
                    f'[local]\naddress = "/run/lmtp"\nprotocol = "lmtp"\n')
    s = fetch_config.load(str(toml), {"domains": None, "host": None})
    assert (s.host, s.port, s.tls, s.verify, s.password) == ("mx.example", 366, "starttls",
                                                             True, b"pw")
    assert s.domains == ("a.example",) and s.local == LocalMtaSettings("lmtp", "/run/lmtp")
    s = fetch_config.load(str(toml), {"host": "[::1]:2366", "tls": "none"})
    assert (s.host, s.port, s.tls) == ("::1", 2366, "none")
    assert "pw" not in repr(s)
    for bad in ({"tls": "ssl"}, {"local_protocol": "lmtp2"}, {"local_address": "nowhere"}):
        with pytest.raises(fetch_config.FetchConfigError):
            fetch_config.load(str(toml), bad)
    toml.write_text('[provider]\nhost = "x"\nuser = "u"\npassword = "in the file"\n')
    with pytest.raises(fetch_config.FetchConfigError, match="unknown setting"):
        fetch_config.load(str(toml), {})


def test_no_password_option_on_the_command_line() -> None:
    from odmr_bridge.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fetch", "--password", "x"])


# -- against real peers -----------------------------------------------------------

def settings_for(bridge: Bridge, local_port: int, *, domains: tuple[str, ...] = (),
                 tls: str = "none", port: int | None = None, user: str = CUSTOMER[0],
                 password: str = CUSTOMER[1], lmtp: bool = False,
                 **more: object) -> FetchSettings:
    return FetchSettings(
        host="127.0.0.1", port=port or bridge.odmr_port, tls=tls, user=user,
        password=password.encode(), domains=domains,
        local=LocalMtaSettings("lmtp" if lmtp else "smtp", ("127.0.0.1", local_port)),
        hostname="customer.test", timeout=30.0, **more)  # type: ignore[arg-type]


def collect(settings: FetchSettings) -> fetch.Outcome:
    return asyncio.run(fetch.collect(settings))


def hold(bridge: Bridge, rcpts: list[str], body: bytes = b"Subject: t\r\n\r\nhi\r\n",
         sender: str = "sender@origin.test", **options: str) -> None:
    results = lmtp_send(bridge.lmtp_port, sender, rcpts, body, **options)
    assert all(code == 250 for code, _ in results), results


# MESSAGES: the conversation checks fetchmail passes (tests/test_end_to_end.py).


def test_collects_once_and_intact_like_fetchmail(bridge: Bridge) -> None:
    for rcpts, data in MESSAGES.values():
        hold(bridge, rcpts, data, mail_options="BODY=8BITMIME" if b"\xc3" in data else "")
    with smtp_sink() as (port, sink):
        outcome = collect(settings_for(bridge, port, domains=("atrn.example",)))
    assert outcome.code == fetch.EXIT_COLLECTED, outcome.message
    assert outcome.report is not None and outcome.report.messages == 3
    assert len(sink.messages) == 3
    got = {tuple(sorted(r)): without_our_trace(c) for _, r, c in sink.messages}
    for rcpts, data in MESSAGES.values():
        assert got[tuple(sorted(rcpts))] == data
    assert all(sender == "sender@origin.test" for sender, _, _ in sink.messages)
    assert bridge.held() == []
    assert bridge.logged("sasl_method=SCRAM-SHA-256")


def test_exit_codes_follow_the_atrn_replies(bridge: Bridge) -> None:
    with smtp_sink() as (port, sink):
        no_mail = collect(settings_for(bridge, port, domains=("atrn.example",)))
        assert no_mail.code == fetch.EXIT_NO_MAIL and "453" in no_mail.message
        refused = collect(settings_for(bridge, port, domains=("foreign.example",)))
        assert refused.code == fetch.EXIT_REFUSED and "450" in refused.message
        wrong = collect(settings_for(bridge, port, password="wrong"))
        assert wrong.code == fetch.EXIT_AUTH_FAILED and "535" in wrong.message
        assert sink.messages == []


def test_local_mta_down_loses_nothing_and_never_asks(bridge: Bridge) -> None:
    hold(bridge, ["a@atrn.example"])
    with smtp_sink() as (port, _):
        dead = port
    down = collect(settings_for(bridge, dead))
    assert down.code == fetch.EXIT_LOCAL_MTA and "stays held" in down.message
    assert len(bridge.held("atrn.example")) == 1
    assert "ATRN" not in bridge.log_text()  # the provider was not even asked
    with smtp_sink() as (port, sink):
        assert collect(settings_for(bridge, port)).code == fetch.EXIT_COLLECTED
    assert len(sink.messages) == 1 and bridge.held() == []


class Scripted:
    """A local MTA with a verdict per recipient (2xx/4xx/5xx) and a DATA delay."""

    def __init__(self, verdicts: dict[str, str], delay: float = 0.0) -> None:
        self.verdicts = verdicts
        self.delay = delay
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        verdict = self.verdicts.get(address.split("@")[0], "250 2.1.5 OK")
        if verdict.startswith("2"):
            envelope.rcpt_tos.append(address)
        return verdict

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        with self.lock:
            self.messages.append((envelope.mail_from or "", list(envelope.rcpt_tos),
                                  envelope.original_content or b""))
        return "250 2.0.0 Ok: stored"


@pytest.fixture
def scripted() -> Iterator[tuple[int, Scripted]]:
    handler = Scripted({"later": "450 4.2.1 mailbox busy, try later",
                        "gone": "550 5.1.1 no such user here"})
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield port, handler
    controller.stop()


def test_per_recipient_verdicts_are_mirrored_to_the_provider(
        bridge: Bridge, scripted: tuple[int, Scripted]) -> None:
    port, mta = scripted
    hold(bridge, ["ok@atrn.example", "later@atrn.example", "gone@atrn.example"])
    outcome = collect(settings_for(bridge, port))
    assert outcome.code == fetch.EXIT_COLLECTED, outcome.message
    assert [r for _, r, _ in mta.messages] == [["ok@atrn.example"]]
    [kept] = bridge.held("atrn.example")
    states = dict((r["address"], r["state"]) for r in kept["recipients"])
    assert states["later@atrn.example"] == "pending"  # 4xx: stays at the provider
    assert states.get("ok@atrn.example", "delivered") == "delivered"
    log = bridge.log_text()
    assert "to=<ok@atrn.example>" in log and "status=sent" in log
    assert "to=<gone@atrn.example>" in log and "dsn=5.1.1, status=bounced" in log
    assert "dsn=4.2.1, status=deferred" in log


def make_tls_bridge(tmp_path: Path, redis_url: str) -> tuple[Bridge, Path]:
    tls = tmp_path / "tls"
    tls.mkdir()
    cert, key = tls / "cert.pem", tls / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=provider.test", "-addext", "subjectAltName=DNS:provider.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    b = Bridge(tmp_path / "bridge", redis_url, extra_env={
        "ODMR_BRIDGE_TLS_CERT_FILE": str(cert), "ODMR_BRIDGE_TLS_KEY_FILE": str(key),
        "ODMR_BRIDGE_ODMR_TLS_LISTEN": f"127.0.0.1:{free_port()}"})
    AccountsFile(b.accounts).add_domain("atrn.example", [CUSTOMER[0]],
                                        {CUSTOMER[0]: CUSTOMER[1].encode()})
    AccountsFile(b.accounts).add_domain("second.example", [CUSTOMER[0]], {})
    b.start()
    return b, cert


@pytest.fixture
def postfix_mta() -> Iterator[tuple[Postfix, tuple[int, object]]]:
    """A real Postfix as the customer's MTA, handing what it accepts to a sink."""
    need("postfix", "postconf", "postmap")
    with smtp_sink() as (sink_port, sink):
        nexthop = f"smtp:[127.0.0.1]:{sink_port}"
        pf = Postfix(["atrn.example", "second.example"],
                     {"atrn.example": nexthop, "second.example": nexthop})
        pf.start()
        yield pf, (sink_port, sink)
        pf.stop()


@pytest.mark.parametrize("mode", ["none", "starttls", "tls"])
def test_several_domains_into_postfix_plain_starttls_and_tls_on_connect(
        tmp_path: Path, redis_url: str, mode: str,
        postfix_mta: tuple[Postfix, tuple[int, object]]) -> None:
    postfix, (_, sink) = postfix_mta
    bridge, cert = make_tls_bridge(tmp_path, redis_url)
    try:
        for i in range(5):
            hold(bridge, [f"a{i}@atrn.example"])
            hold(bridge, [f"b{i}@second.example", f"c{i}@second.example"])
        port = int(bridge.env["ODMR_BRIDGE_ODMR_TLS_LISTEN"].rsplit(":", 1)[1]) \
            if mode == "tls" else bridge.odmr_port
        settings = settings_for(bridge, postfix.smtp_port, tls=mode, port=port,
                                domains=("atrn.example", "second.example"),
                                ca_file=str(cert), server_name="provider.test")
        outcome = collect(settings)
        assert outcome.code == fetch.EXIT_COLLECTED, outcome.message
        assert outcome.report is not None and outcome.report.messages == 10
        assert bridge.held() == []
        wait_for(lambda: len(sink.messages) == 10, timeout=30,  # type: ignore[attr-defined]
                 what="Postfix to pass all ten on")
        if mode != "none":
            assert bridge.logged("TLS connection established")
    finally:
        bridge.stop()


def test_tls_certificate_is_verified(tmp_path: Path, redis_url: str) -> None:
    bridge, _ = make_tls_bridge(tmp_path, redis_url)
    try:
        hold(bridge, ["a@atrn.example"])
        with smtp_sink() as (port, sink):
            outcome = collect(settings_for(bridge, port, tls="starttls",
                                           server_name="provider.test"))
            assert outcome.code == fetch.EXIT_UNREACHABLE and "TLS" in outcome.message
            assert sink.messages == []
        assert len(bridge.held()) == 1
    finally:
        bridge.stop()


def test_provider_killed_mid_session_loses_nothing(
        tmp_path: Path, bridge: Bridge) -> None:
    total = 60
    for i in range(total):
        hold(bridge, [f"r{i}@atrn.example"], f"Subject: {i}\r\n\r\nnumber {i}\r\n".encode())
    handler = Scripted({}, delay=0.02)
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        result: list[fetch.Outcome] = []
        runner = threading.Thread(target=lambda: result.append(collect(
            settings_for(bridge, port))))
        runner.start()
        wait_for(lambda: len(handler.messages) >= 10, timeout=30, what="some deliveries")
        bridge.stop(signal.SIGKILL)
        runner.join(30)
        assert result and result[0].code == fetch.EXIT_UNREACHABLE, result
        first = len(handler.messages)
        assert first < total
        bridge.start()
        outcome = collect(settings_for(bridge, port))
        assert outcome.code == fetch.EXIT_COLLECTED, outcome.message
    finally:
        controller.stop()
    subjects = [c.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for _, _, c in handler.messages]
    assert {s.decode() for s in subjects} == {str(i) for i in range(total)}  # nothing lost
    assert len(subjects) - total <= 1  # only the one in flight, if any, came twice
    assert bridge.held() == []


def test_cli_reads_the_password_from_stdin_and_exits_by_outcome(
        tmp_path: Path, bridge: Bridge) -> None:
    def run(*extra: str, password: str = CUSTOMER[1]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "odmr_bridge", "fetch", "--provider",
             f"127.0.0.1:{bridge.odmr_port}", "--tls", "none", "--user", CUSTOMER[0],
             "--password-file", "-", "--hostname", "customer.test", *extra],
            input=password + "\n", capture_output=True, text=True, cwd=ROOT, timeout=60)

    with smtp_sink() as (port, sink):
        local = ["--local", f"127.0.0.1:{port}"]
        assert run(*local).returncode == fetch.EXIT_NO_MAIL
        wrong = run(*local, password="nope")
        assert wrong.returncode == fetch.EXIT_AUTH_FAILED
        assert "authentication as cust failed" in wrong.stderr and "535" in wrong.stderr
        hold(bridge, ["a@second.example"])
        done = run(*local, "--domain", "second.example")
        assert done.returncode == 0, done.stderr
        assert "collected 1 message(s)" in done.stderr
        assert len(sink.messages) == 1
    assert run("--local", f"127.0.0.1:{port}").returncode == fetch.EXIT_LOCAL_MTA
    usage = subprocess.run([sys.executable, "-m", "odmr_bridge", "fetch", "--user", "x"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert usage.returncode == fetch.EXIT_USAGE and "no provider" in usage.stderr




def test_the_example_file_in_deploy_loads(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    text = (ROOT / "deploy" / "fetch.toml").read_text().replace(
        "/etc/odmr-bridge/fetch.password", str(secret))
    (tmp_path / "fetch.toml").write_text(text)
    s = fetch_config.load(str(tmp_path / "fetch.toml"), {})
    assert (s.host, s.port, s.tls, s.verify) == ("mx.provider.example", 366, "starttls", True)

"""`odmr-bridge postfix setup|remove` and the transport map as the source of truth."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CUSTOMER, need
from tests.peers import Bridge, Postfix, fetchmail, smtp_sink, wait_for
from tests.wire import lmtp_send

pytestmark = pytest.mark.e2e


@pytest.fixture
def bare_postfix() -> Iterator[Postfix]:
    """A throwaway Postfix with nothing of the bridge in it (not started)."""
    need("postfix", "postconf", "postmap")
    pf = Postfix([], {})
    pf.start(run=False)
    yield pf
    pf.stop()


def configs(pf: Postfix) -> tuple[bytes, bytes]:
    return (pf.etc / "main.cf").read_bytes(), (pf.etc / "master.cf").read_bytes()


def setup(bridge: Bridge, pf: Postfix, *extra: str) -> str:
    return bridge.cli("postfix", "setup", "--config-dir", str(pf.etc), *extra).stdout


def test_setup_is_idempotent_and_remove_restores_main_and_master_cf(
        tmp_path: Path, bare_postfix: Postfix) -> None:
    cli = Bridge(tmp_path, "unix:///nonexistent")
    before = configs(bare_postfix)
    assert "would " in setup(cli, bare_postfix, "--dry-run")
    assert configs(bare_postfix) == before

    first = setup(cli, bare_postfix, "--milter", "inet:127.0.0.1:8891")
    assert "master.cf: add 'odmr unix - - n - - lmtp'" in first
    assert "transport_maps" in first and "relay_domains" in first and "smtpd_milters" in first
    after = configs(bare_postfix)
    assert after != before
    assert setup(cli, bare_postfix, "--milter", "inet:127.0.0.1:8891").strip() == \
        "nothing to change"
    assert configs(bare_postfix) == after

    cli.cli("postfix", "remove", "--config-dir", str(bare_postfix.etc),
            "--milter", "inet:127.0.0.1:8891")
    assert configs(bare_postfix) == before


def test_remove_keeps_the_operators_own_list_entries(tmp_path: Path,
                                                     bare_postfix: Postfix) -> None:
    cli = Bridge(tmp_path, "unix:///nonexistent")
    bare_postfix.postconf("-e", "transport_maps = hash:/etc/postfix/transport",
                          "relay_domains = example.org")
    before = configs(bare_postfix)
    setup(cli, bare_postfix)
    out = bare_postfix.etc / "odmr_transport"
    assert f"hash:/etc/postfix/transport, hash:{out}" in (bare_postfix.etc / "main.cf").read_text()
    cli.cli("postfix", "remove", "--config-dir", str(bare_postfix.etc))
    assert configs(bare_postfix) == before


def test_postfix_configured_only_by_the_bridge_delivers_and_fetchmail_collects(
        tmp_path: Path, redis_url: str, bare_postfix: Postfix) -> None:
    need("fetchmail")
    bridge = Bridge(tmp_path / "bridge", redis_url,
                    extra_env={"ODMR_BRIDGE_POSTFIX_CONFIG_DIR": str(bare_postfix.etc)})
    setup(bridge, bare_postfix)
    bare_postfix.run()
    out = bridge.cli("domain", "add", "atrn.example", "--user", CUSTOMER[0],
                     stdin=CUSTOMER[1] + "\n").stdout
    assert "odmr_transport" in out and "reloaded Postfix" in out
    bridge.start()
    try:
        with smtplib.SMTP("127.0.0.1", bare_postfix.smtp_port) as smtp:
            smtp.sendmail("s@origin.test", ["a@atrn.example"], b"Subject: t\r\n\r\nset up\r\n")
        wait_for(lambda: len(bridge.held("atrn.example")) == 1, timeout=30,
                 what="Postfix to hand the message over")
        with smtp_sink() as (port, sink):
            result = fetchmail(tmp_path, bridge.odmr_port, *CUSTOMER, ["atrn.example"], port)
            assert result.returncode == 0, result.stdout + result.stderr
        assert [m[1] for m in sink.messages] == [["a@atrn.example"]]
        out = bridge.cli("domain", "remove", "atrn.example").stdout
        assert "removed atrn.example from" in out
        assert "atrn.example" not in (bare_postfix.etc / "odmr_transport").read_text()
    finally:
        bridge.stop()


def test_a_domain_added_to_the_transport_map_is_live_within_a_second(
        tmp_path: Path, redis_url: str) -> None:
    etc = tmp_path / "postfix-etc"
    etc.mkdir()
    transport_map = etc / "odmr_transport"
    transport_map.write_text("# ATRN domains\n")
    bridge = Bridge(tmp_path / "bridge", redis_url,
                    extra_env={"ODMR_BRIDGE_POSTFIX_CONFIG_DIR": str(etc)})
    bridge.start()
    try:
        body = b"Subject: t\r\n\r\nhi\r\n"
        assert lmtp_send(bridge.lmtp_port, "s@x.test", ["a@new.example"], body)[0][0] == 450
        with transport_map.open("a") as out:
            out.write(f"new.example odmr:inet:[127.0.0.1]:{bridge.lmtp_port}\n")
            out.write("other.example smtp:[mx.other.example]\n")
        wait_for(lambda: lmtp_send(bridge.lmtp_port, "s@x.test", ["a@new.example"],
                                   body)[0][0] == 250, timeout=1.0, interval=0.05,
                 what="the transport map reload")
        # Entries for other transports are not ATRN domains.
        assert lmtp_send(bridge.lmtp_port, "s@x.test", ["a@other.example"], body)[0][0] == 450
    finally:
        bridge.stop()

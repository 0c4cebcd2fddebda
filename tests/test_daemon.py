"""`odmr-bridge serve` as an operator runs it: embedded Redis, start-up reconcile, reloads."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from odmr_bridge.accounts import AccountsFile
from tests.conftest import CUSTOMER
from tests.peers import ROOT, Bridge, RedisServer, port_open, wait_for
from tests.wire import Wire, lmtp_send

BODY = b"Subject: t\r\n\r\nhello\r\n"


def test_without_redis_url_it_runs_a_private_redis_server(tmp_path: Path) -> None:
    b = Bridge(tmp_path / "b", redis_url="")
    b.add_domain("atrn.example", "cust", "pw")
    b.start()
    try:
        assert lmtp_send(b.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)[0][0] == 250
        assert (b.spool / "redis" / "redis.sock").is_socket()
        assert len(b.held("atrn.example")) == 1  # the CLI finds the same private Redis
    finally:
        assert b.stop() == 0
    with pytest.raises(redis.ConnectionError):  # stopped with the bridge
        redis.Redis(unix_socket_path=str(b.spool / "redis" / "redis.sock")).ping()


def test_a_lost_redis_loses_no_mail_serve_rebuilds_the_index(tmp_path: Path) -> None:
    private = RedisServer(tmp_path / "redis")
    private.start()
    b = Bridge(tmp_path / "b", private.url)
    b.add_domain("atrn.example", "cust", "pw")
    b.add_domain("second.example", "cust", "pw2")
    b.start()
    try:
        lmtp_send(b.lmtp_port, "s@x.test", ["a@atrn.example", "c@second.example"], BODY)
        lmtp_send(b.lmtp_port, "", ["b@atrn.example"], BODY)
        before = sorted((m["queue_id"], m["sender"], m["message_size"]) for m in b.held())
        assert b.stop() == 0
        private.restart_empty()
        assert private.client().dbsize() == 0
        b.start()
        after = sorted((m["queue_id"], m["sender"], m["message_size"]) for m in b.held())
        assert after == before and len(after) == 3
        private.client().flushall()
        assert "reindexed 3 message(s) in 2 domain(s)" in b.cli("reindex").stdout
        assert sorted((m["queue_id"], m["sender"], m["message_size"])
                      for m in b.held()) == before
    finally:
        b.stop()
        private.stop()


def test_a_domain_added_while_running_is_accepted_without_restart(bridge: Bridge) -> None:
    refused = lmtp_send(bridge.lmtp_port, "s@x.test", ["a@new.example"], BODY)
    assert refused[0][0] == 450
    AccountsFile(bridge.accounts).add_domain("new.example", ["cust"], {})

    def accepted() -> bool:
        return lmtp_send(bridge.lmtp_port, "s@x.test", ["a@new.example"], BODY)[0][0] == 250
    wait_for(accepted, timeout=5, interval=0.1, what="the reload")
    assert bridge.logged("reloaded")


def test_a_broken_accounts_file_keeps_the_previous_one(bridge: Bridge) -> None:
    bridge.accounts.write_text("{ not json")
    wait_for(lambda: "not reloaded" in bridge.log_text(), timeout=5, what="the reload attempt")
    assert lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)[0][0] == 250


def test_unknown_setting_stops_start_up_naming_it(tmp_path: Path) -> None:
    b = Bridge(tmp_path / "b", "", extra_env={"ODMR_BRIDGE_ODMR_LISTNE": "x"})
    result = b.cli("serve", check=False)
    assert result.returncode == 2
    assert "ODMR_BRIDGE_ODMR_LISTNE" in result.stderr


def test_port_366_can_come_from_systemd_socket_activation(tmp_path: Path, redis_url: str) -> None:
    """As with deploy/odmr-bridge.socket: systemd binds, the unprivileged daemon serves."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    b = Bridge(tmp_path / "b", redis_url, extra_env={"ODMR_BRIDGE_ODMR_LISTEN": "systemd:odmr"})
    b.add_domain("atrn.example", *CUSTOMER)
    # What systemd does between fork and exec: the socket at fd 3, LISTEN_* set.
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', "
                "LISTEN_FDNAMES='odmr'); "
                "os.execv(sys.executable, [sys.executable, '-m', 'odmr_bridge', 'serve'])")
    with open(b.log, "ab") as log:
        process = subprocess.Popen([sys.executable, "-c", launcher, str(listener.fileno())],
                                   env=b.env, cwd=ROOT, stdout=log, stderr=log,
                                   pass_fds=(listener.fileno(),))
    listener.close()
    try:
        wait_for(lambda: port_open(b.lmtp_port), what="the bridge")
        w = Wire(port)
        w.login(*CUSTOMER)
        assert w.command("ATRN atrn.example")[0] == 453
    finally:
        process.terminate()
        assert process.wait(30) == 0


def test_a_missing_systemd_socket_stops_start_up_with_a_clear_error(tmp_path: Path,
                                                                    redis_url: str) -> None:
    b = Bridge(tmp_path / "b", redis_url, extra_env={"ODMR_BRIDGE_ODMR_LISTEN": "systemd:odmr"})
    result = b.cli("serve", check=False)
    assert result.returncode == 1
    assert "no socket named 'odmr' from systemd" in result.stderr


def test_a_session_keeps_the_configuration_it_started_with(bridge: Bridge) -> None:
    before = Wire(bridge.odmr_port)
    before.login(*CUSTOMER)
    AccountsFile(bridge.accounts).set_domain("atrn.example", users=["other"])
    wait_for(lambda: "reloaded" in bridge.log_text(), timeout=5, what="the reload")
    after = Wire(bridge.odmr_port)
    after.login(*CUSTOMER)
    assert after.command("ATRN atrn.example")[0] == 450  # the new rules
    assert before.command("ATRN atrn.example")[0] == 453  # the rules it started with

"""A full spool file system: intake answers 4xx, nothing half-written appears, and
intake recovers as soon as there is room again.  The spool is a small tmpfs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from odmr_bridge.spool import Spool
from tests.conftest import CUSTOMER
from tests.peers import Bridge
from tests.wire import lmtp_send, without_our_trace

MESSAGE = b"Subject: filler\r\n\r\n" + (b"y" * 76 + b"\r\n") * 260  # ~20 KB


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "spool"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k,mode=0700", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}"
        if os.environ.get("ODMR_TESTS_REQUIRE_PEERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_spool_tempfails_intake_and_recovers(tmp_path: Path, redis_url: str,
                                                    small_spool: Path) -> None:
    bridge = Bridge(tmp_path / "bridge", redis_url,
                    extra_env={"ODMR_BRIDGE_SPOOL_DIR": str(small_spool)})
    bridge.add_domain("atrn.example", *CUSTOMER)
    bridge.start()
    try:
        accepted: list[str] = []
        replies: list[tuple[int, str]] = []
        for n in range(60):  # 400 KB hold at most ~19 of these
            [reply] = lmtp_send(bridge.lmtp_port, "s@x.test", [f"r{n}@atrn.example"], MESSAGE)
            replies.append(reply)
            if reply[0] == 250:
                accepted.append(reply[1].split()[-1])
            else:
                break
        code, text = replies[-1]
        assert (code, text.split()[0]) == (452, "4.3.1"), replies[-1]
        assert "insufficient system storage" in text
        assert len(accepted) >= 5

        # Nothing half-written is visible: every queue file is whole, the index
        # lists exactly the acknowledged messages, incoming/ holds no leftovers.
        spool = Spool(small_spool)
        assert sorted(spool.ids()) == sorted(accepted)
        for qid in accepted:
            with spool.open_body(qid) as (body, _):
                assert without_our_trace(body.read()) == MESSAGE
        assert list(spool.incoming.iterdir()) == []
        assert sorted(m["queue_id"] for m in bridge.held()) == sorted(accepted)

        # Room again (the operator deletes some mail): intake works at once.
        bridge.cli("queue", "delete", *accepted[:3])
        [(code, _)] = lmtp_send(bridge.lmtp_port, "s@x.test", ["late@atrn.example"], MESSAGE)
        assert code == 250
        assert len(bridge.held()) == len(accepted) - 3 + 1
    finally:
        bridge.stop()
    assert bridge.logged("warning: queue commit failed")

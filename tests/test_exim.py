"""contrib/exim with a real Exim binary: the router and transport hand mail to the intake."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.peers import ROOT, Bridge

EXIM = ROOT / ".cache" / "exim" / "root" / "usr" / "sbin" / "exim4"


def binary(config: Path) -> Path:
    """The test's copy of Exim (see exim_config)."""
    return config.parent / "exim" / "usr" / "sbin" / "exim4"


@pytest.fixture
def exim_config(bridge: Bridge) -> Iterator[Path]:
    if not EXIM.exists():
        need(str(EXIM))  # scripts/fetch-exim unpacks it
    # Exim drops to its own user, which cannot enter pytest's 0700 temp dirs.
    work = Path(tempfile.mkdtemp(prefix="odmr-exim-"))
    (work / "spool").mkdir()
    os.chmod(work, 0o777)
    os.chmod(work / "spool", 0o777)
    # Exim re-executes itself as Debian-exim to deliver: its binary must be
    # where that user can reach it (a checkout under /root is not).
    shutil.copytree(EXIM.parents[2], work / "exim", symlinks=True)
    domains = work / "odmr_domains"
    domains.write_text("atrn.example\nsecond.example\n")
    snippet = (ROOT / "contrib" / "exim" / "odmr-bridge.conf").read_text()
    snippet = snippet.replace("/etc/exim4/odmr_domains", str(domains))
    snippet = re.sub(r"port = 10025", f"port = {bridge.lmtp_port}", snippet)
    main = (f"exim_user = Debian-exim\nexim_group = Debian-exim\n"
            f"spool_directory = {work}/spool\nlog_file_path = {work}/%slog\n"
            "primary_hostname = mx.test\nkeep_environment = LD_LIBRARY_PATH\n"
            f"exim_path = {binary(work / 'exim.conf')}\n")
    config = work / "exim.conf"
    config.write_text(main + snippet)
    yield config
    shutil.rmtree(work, ignore_errors=True)


def exim(config: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    # scripts/fetch-exim unpacks the libraries this machine lacks beside the binary.
    root = config.parent / "exim"
    libs = ":".join(str(d) for d in sorted(root.glob("**/lib/*-linux-gnu")))
    return subprocess.run([str(binary(config)), "-C", str(config), *args], input=stdin,
                          capture_output=True, env={**os.environ, "LD_LIBRARY_PATH": libs},
                          timeout=60)


def test_exims_parser_accepts_the_contrib_config(exim_config: Path) -> None:
    result = exim(exim_config, "-bV")
    assert result.returncode == 0, result.stderr
    routed = exim(exim_config, "-bt", "someone@atrn.example")
    assert b"router = odmr_bridge, transport = odmr_lmtp" in routed.stdout, routed.stdout


def test_exim_delivers_atrn_mail_to_the_bridge_once_per_recipient(exim_config: Path,
                                                                  bridge: Bridge) -> None:
    message = b"Subject: via exim\r\n\r\nhello from Exim\r\n"
    result = exim(exim_config, "-odi", "-f", "s@origin.test", "a@atrn.example",
                  "b@atrn.example", "c@second.example", stdin=message)
    assert result.returncode == 0, result.stderr
    logs = {name: (exim_config.parent / name).read_text(errors="replace")
            for name in ("mainlog", "paniclog", "rejectlog")
            if (exim_config.parent / name).exists()}
    held = {m["domain"]: sorted(r["address"] for r in m["recipients"]) for m in bridge.held()}
    for name, text in logs.items():  # shown when the test fails
        print(f"--- exim {name}\n{text}")
    print(f"--- bridge\n{bridge.log_text()[-3000:]}")
    assert held == {"atrn.example": ["a@atrn.example", "b@atrn.example"],
                    "second.example": ["c@second.example"]}
    log = logs["mainlog"]
    assert log.count("=> ") + log.count("-> ") == 3 and "Completed" in log

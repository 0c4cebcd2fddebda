"""Postfix's transport map as the source of truth for which domains are ATRN domains.

The entries whose transport is the bridge's (``odmr:``) are the ATRN
domains.  The daemon reads them (and reloads on change); ``domain add`` and
``domain remove`` edit the file, run ``postmap`` and reload Postfix.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from odmr_bridge.accounts import AccountsError, normalize_domain
from odmr_bridge.config import Settings, SystemdSocket, parse_listen
from odmr_bridge.watch import Reloading

_ENTRY = re.compile(r"^(?P<key>\S+)\s+(?P<value>\S.*?)\s*$")


def nexthop(settings: Settings) -> str:
    """The transport map value that routes a domain to this bridge."""
    target = parse_listen(settings.lmtp.listen)
    if isinstance(target, SystemdSocket):
        raise AccountsError("lmtp.listen is a systemd socket: write the transport map by hand")
    if isinstance(target, str):
        return f"{settings.postfix.transport}:unix:{target}"
    host, port = target
    return f"{settings.postfix.transport}:inet:[{host}]:{port}"


def map_path(settings: Settings) -> Path:
    """``postfix.transport_map``, else ``odmr_transport`` in the Postfix config directory."""
    configured = settings.postfix.transport_map
    return Path(configured) if configured else Path(settings.postfix.config_dir) / "odmr_transport"


def read_atrn_domains(path: Path, transport: str) -> frozenset[str]:
    """Domains whose transport map entry uses *transport*; a missing file has none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return frozenset()
    found = set()
    for line in text.splitlines():
        match = _ENTRY.match(line)
        if line.startswith("#") or match is None:
            continue
        if match["value"].split(":", 1)[0] != transport:
            continue
        try:
            found.add(normalize_domain(match["key"]))
        except AccountsError:
            continue  # wildcards like ".example.com" are Postfix's business
    return frozenset(found)


def watched_atrn_domains(settings: Settings) -> Reloading[frozenset[str]]:
    """The transport map's ATRN domains, reloaded when the file changes (started)."""
    transport = settings.postfix.transport
    domains = Reloading(map_path(settings), lambda path: read_atrn_domains(path, transport))
    domains.start(create_parent=False)  # never create the MTA's config directory
    return domains


class TransportMap:
    """Edits of the transport map source file, each followed by postmap."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = map_path(settings)

    def _write(self, lines: list[str]) -> None:
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temp.write_text("".join(f"{line}\n" for line in lines))
        if self.path.exists():
            os.chmod(temp, self.path.stat().st_mode & 0o7777)
        os.replace(temp, self.path)
        self.postmap()

    def postmap(self) -> None:
        run(["postmap", "-c", self.settings.postfix.config_dir, f"hash:{self.path}"])

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def add(self, domain: str) -> bool:
        """Route *domain* to the bridge; False if it already is."""
        value = nexthop(self.settings)
        lines = self._lines()
        for line in lines:
            match = _ENTRY.match(line)
            if match and not line.startswith("#") and match["key"].lower() == domain:
                if match["value"] == value:
                    return False
                raise AccountsError(f"{self.path}: {domain} is routed to {match['value']}, "
                                    "not to this bridge; edit the map by hand")
        self._write([*lines, f"{domain} {value}"])
        return True

    def remove(self, domain: str) -> bool:
        lines = self._lines()
        kept = [line for line in lines
                if not ((m := _ENTRY.match(line)) and not line.startswith("#")
                        and m["key"].lower() == domain
                        and m["value"].startswith(self.settings.postfix.transport + ":"))]
        if kept == lines:
            return False
        self._write(kept)
        return True


def run(command: list[str]) -> str:
    """Run a Postfix tool; a failure raises AccountsError with its message."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise AccountsError(f"{command[0]}: not installed (is Postfix?)") from None
    if result.returncode != 0:
        raise AccountsError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout}")
    return result.stdout


def reload_postfix(config_dir: str) -> bool:
    """``postfix reload`` if that instance runs; True if it was reloaded."""
    status = subprocess.run(["postfix", "-c", config_dir, "status"], capture_output=True)
    if status.returncode != 0:
        return False
    run(["postfix", "-c", config_dir, "reload"])
    return True

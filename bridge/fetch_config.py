"""Settings of ``odmr-bridge fetch`` (the customer side): TOML file, then flags.

Frozen, checked once.  The password is read from a file (``-``: the first
line of stdin), never from the command line.  Example: ``deploy/fetch.toml``.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any, TextIO

from odmr_bridge.config import parse_host_port

ODMR_PORT = 366
TLS_MODES = ("starttls", "tls", "none")
LOCAL_PROTOCOLS = ("smtp", "lmtp")


class FetchConfigError(Exception):
    """A bad or missing setting; the message names it."""


@dataclasses.dataclass(frozen=True)
class LocalMtaSettings:
    """Where collected mail goes: an SMTP or LMTP server, TCP or unix socket."""

    protocol: str = "smtp"
    address: tuple[str, int] | str = ("127.0.0.1", 25)

    def describe(self) -> str:
        where = self.address if isinstance(self.address, str) else \
            f"{self.address[0]}:{self.address[1]}"
        return f"{self.protocol}:{where}"


@dataclasses.dataclass(frozen=True)
class FetchSettings:
    host: str
    port: int
    tls: str
    user: str
    password: bytes = dataclasses.field(repr=False)
    domains: tuple[str, ...] = ()
    verify: bool = True
    ca_file: str | None = None
    server_name: str | None = None  # the name the certificate must carry; default host
    local: LocalMtaSettings = LocalMtaSettings()
    hostname: str = ""  # ours, in EHLO and in the 220 after the reversal
    timeout: float = 300.0


def parse_provider(value: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port); the port defaults to 366."""
    if value.startswith("[") and value.endswith("]"):
        return value[1:-1], ODMR_PORT
    if value.count(":") == 1 or value.startswith("["):
        try:
            return parse_host_port(value)
        except ValueError as exc:
            raise FetchConfigError(f"provider: {exc}") from None
    if not value:
        raise FetchConfigError("provider: no host given")
    return value, ODMR_PORT


def parse_local(value: str) -> tuple[str, int] | str:
    """``host:port`` or an absolute unix socket path."""
    if value.startswith("/"):
        return value
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise FetchConfigError(f"local MTA address: {exc}") from None


def read_password(path: str, stdin: TextIO | None = None) -> bytes:
    """First line of *path*; ``-`` means stdin."""
    try:
        if path == "-":
            line = (stdin or sys.stdin).readline()
        else:
            with open(path, encoding="utf-8") as handle:
                line = handle.readline()
    except OSError as exc:
        raise FetchConfigError(f"password_file {path}: {exc.strerror}") from None
    password = line.rstrip("\r\n")
    if not password:
        raise FetchConfigError(f"password_file {path}: empty")
    return password.encode("utf-8")


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise FetchConfigError(f"[{name}] must be a table")
    return value


def _known(table: dict[str, Any], name: str, keys: set[str]) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise FetchConfigError(f"[{name}]: unknown setting(s) {', '.join(unknown)}")


def load(path: str | None, overrides: dict[str, Any],
         stdin: TextIO | None = None) -> FetchSettings:
    """Settings from the TOML file at *path* (if any), then *overrides* (flags, not None)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise FetchConfigError(f"{path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise FetchConfigError(f"{path}: {exc}") from None
    _known(data, "top level", {"provider", "local"})
    provider, local = _table(data, "provider"), _table(data, "local")
    _known(provider, "provider", {"host", "port", "tls", "verify", "ca_file", "server_name",
                                  "user", "password_file", "domains", "timeout"})
    _known(local, "local", {"protocol", "address", "hostname"})
    merged: dict[str, Any] = {**provider, **{f"local_{k}": v for k, v in local.items()}}
    merged.update({k: v for k, v in overrides.items() if v is not None})

    if "host" not in merged:
        raise FetchConfigError("no provider: set [provider] host or --provider")
    host, port = parse_provider(str(merged["host"]))
    port = int(merged.get("port", port))
    tls = str(merged.get("tls", "starttls"))
    if tls not in TLS_MODES:
        raise FetchConfigError(f"tls: expected one of {', '.join(TLS_MODES)}, got {tls!r}")
    user = merged.get("user")
    if not user:
        raise FetchConfigError("no user: set [provider] user or --user")
    if "password_file" not in merged:
        raise FetchConfigError("no password: set [provider] password_file or --password-file "
                               "(- for stdin)")
    domains = merged.get("domains", [])
    if isinstance(domains, str):
        domains = [domains]
    if not isinstance(domains, list) or not all(isinstance(d, str) and d for d in domains):
        raise FetchConfigError("domains: expected a list of domain names")
    protocol = str(merged.get("local_protocol", "smtp")).lower()
    if protocol not in LOCAL_PROTOCOLS:
        raise FetchConfigError(f"[local] protocol: expected smtp or lmtp, got {protocol!r}")
    address = parse_local(str(merged.get("local_address", "127.0.0.1:25")))
    timeout = float(merged.get("timeout", 300.0))
    if timeout <= 0:
        raise FetchConfigError("timeout: must be > 0")
    ca_file = merged.get("ca_file") or None
    if ca_file is not None and not Path(ca_file).is_file():
        raise FetchConfigError(f"ca_file {ca_file}: not found")
    return FetchSettings(
        host=host, port=port, tls=tls, user=str(user),
        password=read_password(str(merged["password_file"]), stdin),
        domains=tuple(d.strip().lower().rstrip(".") for d in domains),
        verify=bool(merged.get("verify", True)), ca_file=ca_file,
        server_name=merged.get("server_name") or None,
        local=LocalMtaSettings(protocol, address),
        hostname=str(merged.get("local_hostname") or socket.getfqdn()),
        timeout=timeout,
    )

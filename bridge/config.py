"""Typed, frozen settings: built-in defaults < TOML file < environment.

The file comes from ``-c/--config``, else ``$ODMR_BRIDGE_CONFIG``, else
``/etc/odmr-bridge/odmr-bridge.toml`` when it exists, else only the defaults
apply.  Every key can be overridden by ``ODMR_BRIDGE_<SECTION>_<KEY>``.
An unknown section or key, or a value of the wrong kind, raises
:class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/odmr-bridge/odmr-bridge.toml")
ENV_PREFIX = "ODMR_BRIDGE_"


class ConfigError(Exception):
    """A setting is unknown or has a bad value; the message names it."""


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    # Exactly one of url, cluster_nodes, sentinels says where Redis is.
    # url empty (and the other two empty): start a private redis-server under
    # the spool directory.
    url: str = ""
    # A Redis Cluster: some of its nodes, "host:port,host:port,...".
    cluster_nodes: str = ""
    # Redis Sentinel: the sentinels "host:port,..." and the master's name.
    sentinels: str = ""
    sentinel_master: str = ""
    # AUTH password of the Redis servers (cluster nodes, sentinel-managed master).
    password: str = ""
    # Replicas that must confirm a write (WAIT) before mail is acknowledged;
    # -1: 1 with cluster_nodes or sentinels, 0 with url.
    wait_replicas: int = -1
    server_binary: str = "redis-server"


@dataclasses.dataclass(frozen=True)
class SpoolSettings:
    dir: str = "/var/spool/odmr-bridge"


@dataclasses.dataclass(frozen=True)
class StoreSettings:
    # "files": messages on this node's spool, Redis the index (one node).
    # "redis": messages in Redis beside their index (any number of nodes).
    kind: str = "files"
    # How long a write waits for redis.wait_replicas replicas to confirm it.
    wait_timeout: float = 1.0


@dataclasses.dataclass(frozen=True)
class LmtpSettings:
    # "host:port" or an absolute unix socket path.
    listen: str = "127.0.0.1:10025"
    max_message_size: int = 52_428_800
    timeout: float = 300.0


@dataclasses.dataclass(frozen=True)
class OdmrSettings:
    listen: str = "0.0.0.0:366"
    # A second listener speaking TLS from the first byte (fetchmail's "ssl"); empty: none.
    tls_listen: str = ""
    hostname: str = ""
    # Error replies a client may provoke before it is disconnected (421).
    max_bad_commands: int = 10
    # Per client address, over every instance on this Redis (Postfix's anvil):
    # connections at once, and new connections per minute (0: no limit).
    client_connection_limit: int = 50
    client_connection_rate_limit: int = 300
    # How long one ATRN session may hold a domain without renewing its lease.
    lease_seconds: float = 60.0
    # Idle time allowed before ATRN, and per step of the reversed session.
    command_timeout: float = 300.0
    reply_timeout: float = 300.0
    data_timeout: float = 600.0
    shutdown_grace: float = 30.0


@dataclasses.dataclass(frozen=True)
class TlsSettings:
    # PEM files; both empty: no STARTTLS and no TLS listener. Reloaded on change.
    cert_file: str = ""
    key_file: str = ""
    # Refuse AUTH and ATRN over a connection without TLS (530 5.7.0).
    require_tls: bool = False


@dataclasses.dataclass(frozen=True)
class AuthSettings:
    # After max_failures failed AUTHs within failure_window seconds, from one
    # client address or for one user name, AUTH answers 454 4.7.0 after
    # failure_delay seconds. Counters live in Redis, shared by all instances.
    max_failures: int = 5
    failure_window: float = 300.0
    failure_delay: float = 5.0


@dataclasses.dataclass(frozen=True)
class AccountsSettings:
    # The file with ATRN domains and their customers' credentials.
    file: str = "/etc/odmr-bridge/customers.json"


@dataclasses.dataclass(frozen=True)
class PostfixSettings:
    # The Postfix instance the bridge is wired into (`postconf -c`).
    config_dir: str = "/etc/postfix"
    # The transport map whose entries for `transport` are ATRN domains (beside
    # those in the customers file); empty: <config_dir>/odmr_transport, which
    # `postfix setup` creates. A missing file lists no domains.
    transport_map: str = ""
    # The master.cf service (an lmtp clone) that carries mail to the bridge.
    transport: str = "odmr"


@dataclasses.dataclass(frozen=True)
class MilterSettings:
    # pymilter socket spec: "inet:PORT@HOST" or "unix:/path".
    listen: str = "inet:8891@127.0.0.1"
    # Redis unreachable: "tempfail" (mail waits at the sender) or "accept".
    on_redis_error: str = "tempfail"


@dataclasses.dataclass(frozen=True)
class QueueSettings:
    # Seconds a message may wait for its customer before it is returned to
    # the sender (Postfix's maximal_queue_lifetime): 5 days.
    max_hold: float = 432_000.0
    # Seconds after which the sender gets one delay warning; 0: none
    # (Postfix's delay_warning_time).
    delay_warning: float = 0.0
    # Seconds between queue passes (expiry, warnings, sending notices).
    sweep_interval: float = 60.0


@dataclasses.dataclass(frozen=True)
class BounceSettings:
    # The host MTA's SMTP service that takes our notices (bounces, delay
    # warnings) for delivery to senders: "host:port".
    relay: str = "127.0.0.1:25"
    # Larger originals are returned as headers only (Postfix's bounce_size_limit).
    size_limit: int = 50_000


@dataclasses.dataclass(frozen=True)
class MetricsSettings:
    # Prometheus endpoint "host:port" (GET /metrics); empty: none.
    listen: str = "127.0.0.1:9366"


@dataclasses.dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    # "stderr" (journald, docker) or "syslog" (facility mail, like Postfix).
    target: str = "stderr"
    syslog_socket: str = "/dev/log"


@dataclasses.dataclass(frozen=True)
class Settings:
    redis: RedisSettings = RedisSettings()
    spool: SpoolSettings = SpoolSettings()
    store: StoreSettings = StoreSettings()
    lmtp: LmtpSettings = LmtpSettings()
    odmr: OdmrSettings = OdmrSettings()
    tls: TlsSettings = TlsSettings()
    auth: AuthSettings = AuthSettings()
    accounts: AccountsSettings = AccountsSettings()
    postfix: PostfixSettings = PostfixSettings()
    milter: MilterSettings = MilterSettings()
    queue: QueueSettings = QueueSettings()
    bounce: BounceSettings = BounceSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()


_LOG_LEVELS = {"debug", "info", "warning", "error"}
_BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "1": True,
                  "false": False, "no": False, "off": False, "0": False}


def _coerce(name: str, kind: type, value: Any, from_env: bool) -> Any:
    """Return *value* as *kind* or raise ConfigError naming *name*."""
    if kind is str:
        if isinstance(value, str):
            return value
    elif kind is bool:
        if isinstance(value, bool):
            return value
        if from_env and value.lower() in _BOOLEAN_WORDS:
            return _BOOLEAN_WORDS[value.lower()]
    elif kind is int:
        if from_env:
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if from_env:
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")


def _section_types(section_cls: type) -> dict[str, type]:
    hints = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: hints[str(f.type)] for f in dataclasses.fields(section_cls)}


def parse_host_ports(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` -> [(host, port), ...]; at least one."""
    nodes = [parse_host_port(item.strip()) for item in value.split(",") if item.strip()]
    if not nodes:
        raise ValueError(f"expected host:port[,host:port...], got {value!r}")
    return nodes


def _validate_redis(redis: RedisSettings) -> None:
    chosen = [name for name in ("url", "cluster_nodes", "sentinels") if getattr(redis, name)]
    if len(chosen) > 1:
        raise ConfigError(f"redis.{' and redis.'.join(chosen)}: set only one of redis.url, "
                          "redis.cluster_nodes, redis.sentinels")
    for name in ("cluster_nodes", "sentinels"):
        if getattr(redis, name):
            try:
                parse_host_ports(getattr(redis, name))
            except ValueError as exc:
                raise ConfigError(f"redis.{name}: {exc}") from None
    if bool(redis.sentinels) != bool(redis.sentinel_master):
        raise ConfigError("redis.sentinels and redis.sentinel_master: set both or neither")
    if redis.wait_replicas < -1:
        raise ConfigError("redis.wait_replicas: must be 0 or more (-1: the default), "
                          f"got {redis.wait_replicas!r}")


def _validate(settings: Settings) -> None:
    _validate_redis(settings.redis)
    if settings.log.level not in _LOG_LEVELS:
        raise ConfigError(
            f"log.level: expected one of {sorted(_LOG_LEVELS)}, got {settings.log.level!r}"
        )
    if settings.log.target not in ("stderr", "syslog"):
        raise ConfigError(f"log.target: expected 'stderr' or 'syslog', got {settings.log.target!r}")
    listeners = [("lmtp.listen", settings.lmtp.listen), ("odmr.listen", settings.odmr.listen)]
    if settings.odmr.tls_listen:
        listeners.append(("odmr.tls_listen", settings.odmr.tls_listen))
    for name, value in listeners:
        try:
            parse_listen(value)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    peers = [("bounce.relay", settings.bounce.relay)]
    if settings.metrics.listen:
        peers.append(("metrics.listen", settings.metrics.listen))
    for name, value in peers:
        try:
            parse_host_port(value)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    for name, number in (("lmtp.max_message_size", settings.lmtp.max_message_size),
                         ("odmr.lease_seconds", settings.odmr.lease_seconds),
                         ("odmr.max_bad_commands", settings.odmr.max_bad_commands),
                         ("auth.max_failures", settings.auth.max_failures),
                         ("auth.failure_window", settings.auth.failure_window),
                         ("queue.max_hold", settings.queue.max_hold),
                         ("queue.sweep_interval", settings.queue.sweep_interval),
                         ("bounce.size_limit", settings.bounce.size_limit)):
        if number <= 0:
            raise ConfigError(f"{name}: must be positive, got {number!r}")
    for name, number in (("odmr.client_connection_limit", settings.odmr.client_connection_limit),
                         ("odmr.client_connection_rate_limit",
                          settings.odmr.client_connection_rate_limit)):
        if number < 0:
            raise ConfigError(f"{name}: must be 0 (no limit) or positive, got {number!r}")
    if not 0 <= settings.queue.delay_warning < settings.queue.max_hold:
        raise ConfigError("queue.delay_warning: must be 0 (off) or less than queue.max_hold, "
                          f"got {settings.queue.delay_warning!r}")
    if settings.store.kind not in ("files", "redis"):
        raise ConfigError(f"store.kind: expected 'files' or 'redis', got {settings.store.kind!r}")
    redis = settings.redis
    if settings.store.kind == "redis" and not (redis.url or redis.cluster_nodes
                                               or redis.sentinels):
        raise ConfigError("store.kind = 'redis' keeps the mail in Redis: it needs a Redis "
                          "that keeps its data ([redis] url, cluster_nodes or sentinels), "
                          "not the embedded private one")
    if settings.store.wait_timeout <= 0:
        raise ConfigError(f"store.wait_timeout: must be positive, got "
                          f"{settings.store.wait_timeout!r}")
    if settings.milter.on_redis_error not in ("tempfail", "accept"):
        raise ConfigError("milter.on_redis_error: expected 'tempfail' or 'accept', "
                          f"got {settings.milter.on_redis_error!r}")
    tls = settings.tls
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigError("tls.cert_file and tls.key_file: set both or neither")
    if (tls.require_tls or settings.odmr.tls_listen) and not tls.cert_file:
        raise ConfigError("tls.cert_file: needed by tls.require_tls / odmr.tls_listen")


def build(file_data: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Combine TOML data and environment overrides into Settings."""
    sections: dict[str, dict[str, Any]] = {}
    fields = {f.name: f.type for f in dataclasses.fields(Settings)}
    section_classes = {name: type(getattr(Settings(), name)) for name in fields}
    for section, values in file_data.items():
        if section not in section_classes:
            raise ConfigError(f"[{section}]: unknown section")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}]: expected a table")
        types = _section_types(section_classes[section])
        for key, value in values.items():
            if key not in types:
                raise ConfigError(f"{section}.{key}: unknown key")
            sections.setdefault(section, {})[key] = _coerce(
                f"{section}.{key}", types[key], value, from_env=False
            )
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        rest = var[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in section_classes:
            raise ConfigError(f"{var}: unknown section {section!r}")
        types = _section_types(section_classes[section])
        if key not in types:
            raise ConfigError(f"{var}: unknown key {section}.{key}")
        sections.setdefault(section, {})[key] = _coerce(var, types[key], value, from_env=True)
    settings = Settings(**{
        name: section_classes[name](**sections.get(name, {})) for name in section_classes
    })
    _validate(settings)
    return settings


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load settings from *path* (or the usual places) and the environment."""
    env = os.environ if environ is None else environ
    chosen = path or env.get(ENV_PREFIX + "CONFIG")
    data: dict[str, Any] = {}
    if chosen is not None:
        file = Path(chosen)
        if not file.is_file():
            raise ConfigError(f"config file {file}: not found")
    elif DEFAULT_CONFIG_PATH.is_file():
        file = DEFAULT_CONFIG_PATH
    else:
        file = None
    if file is not None:
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {file}: {exc}") from None
    return build(data, env)


@dataclasses.dataclass(frozen=True)
class SystemdSocket:
    name: str


def _split_host_port(value: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port`` too) -> (host, port), host possibly empty; None if not."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    return host.strip("[]"), int(port)


def parse_host_port(value: str) -> tuple[str, int]:
    """``host:port`` to connect to -> (host, port); both must be given."""
    split = _split_host_port(value)
    if split is None or not split[0] or not split[1]:
        raise ValueError(f"expected host:port, got {value!r}")
    return split


def parse_listen(value: str) -> tuple[str, int] | str | SystemdSocket:
    """``host:port`` -> (host, port); an absolute path -> a unix socket path;
    ``systemd:NAME`` -> the socket systemd passes under that name."""
    if value.startswith("/"):
        return value
    if value.startswith("systemd:") and len(value) > len("systemd:"):
        return SystemdSocket(value[len("systemd:"):])
    split = _split_host_port(value)
    if split is None:
        raise ValueError(f"expected host:port or an absolute socket path, got {value!r}")
    return split[0] or "0.0.0.0", split[1]

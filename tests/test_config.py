"""Settings: defaults, TOML, environment overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from odmr_bridge.config import ConfigError, build, load, parse_listen


def test_defaults_are_the_documented_ones() -> None:
    s = build({}, {})
    assert s.lmtp.listen == "127.0.0.1:10025"
    assert s.odmr.listen == "0.0.0.0:366"
    assert s.redis.url == ""  # a private redis-server


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[redis]\nurl = "redis://file"\n[spool]\ndir = "/from/file"\n')
    s = load(str(f), {"ODMR_BRIDGE_REDIS_URL": "redis://env",
                      "ODMR_BRIDGE_ODMR_LEASE_SECONDS": "12.5",
                      "ODMR_BRIDGE_ODMR_HOSTNAME": "mx.example"})
    assert s.redis.url == "redis://env"
    assert s.spool.dir == "/from/file"
    assert s.odmr.lease_seconds == 12.5
    assert s.odmr.hostname == "mx.example"


@pytest.mark.parametrize(("data", "env", "named"), [
    ({"lmtp": {"listne": "x"}}, {}, "lmtp.listne"),
    ({"nosuch": {}}, {}, "nosuch"),
    ({"lmtp": {"max_message_size": "big"}}, {}, "lmtp.max_message_size"),
    ({}, {"ODMR_BRIDGE_LMTP_LISTEN": "nonsense"}, "lmtp.listen"),
    ({}, {"ODMR_BRIDGE_SPOOL_DIRR": "/x"}, "ODMR_BRIDGE_SPOOL_DIRR"),
    ({}, {"ODMR_BRIDGE_ODMR_LEASE_SECONDS": "soon"}, "ODMR_BRIDGE_ODMR_LEASE_SECONDS"),
    ({"log": {"level": "loud"}}, {}, "log.level"),
    ({"log": {"target": "file"}}, {}, "log.target"),
    ({"bounce": {"relay": "localhost"}}, {}, "bounce.relay"),
    ({"metrics": {"listen": ":9366"}}, {}, "metrics.listen"),
    ({"queue": {"max_hold": 0}}, {}, "queue.max_hold"),
    ({"queue": {"delay_warning": 500000.0}}, {}, "queue.delay_warning"),
])
def test_bad_settings_stop_with_the_key_named(data: dict, env: dict, named: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        build(data, env)


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(str(tmp_path / "absent.toml"), {})


def test_listen_forms() -> None:
    assert parse_listen("127.0.0.1:10025") == ("127.0.0.1", 10025)
    assert parse_listen("[::1]:366") == ("::1", 366)
    assert parse_listen("/run/odmr/lmtp.sock") == "/run/odmr/lmtp.sock"


def test_the_shipped_example_config_is_valid_and_complete() -> None:
    example = Path(__file__).resolve().parent.parent / "deploy" / "odmr-bridge.toml"
    settings = load(str(example), {})
    assert settings == build({}, {})  # it spells out exactly the defaults
    import tomllib
    data = tomllib.loads(example.read_text())
    for section in dataclasses.fields(settings):
        keys = {f.name for f in dataclasses.fields(getattr(settings, section.name))}
        assert set(data[section.name]) == keys, section.name

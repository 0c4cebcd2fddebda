"""Fuzzing: parsers and decoders fed arbitrary input raise only their own errors.

CI runs a short pass; `scripts/fuzz [MINUTES]` runs the same properties for
as long as asked (default 10 minutes) with the "fuzz" Hypothesis profile.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

import scramp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import cram, sasl
from bridge.accounts import Accounts, AccountsError
from bridge.config import ConfigError, build
from bridge.dsn import MAIL_PARAMETERS, RCPT_PARAMETERS, DsnSyntaxError, split_parameters
from bridge.odmr import parse_atrn_argument, with_enhanced_code
from bridge.smtp_client import ProtocolError, parse_reply_line
from bridge.spool import MAGIC, TRAILER, CorruptQueueFile, parse_header

settings.register_profile("ci", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=10**9, deadline=None,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=20)


def queue_file_like() -> st.SearchStrategy[bytes]:
    header = st.one_of(st.binary(max_size=200), json_values.map(
        lambda v: json.dumps(v).encode()))
    return st.tuples(st.sampled_from([MAGIC, b"", b"ODMRQ 2\n"]), header,
                     st.sampled_from([b"\n", b""]), st.binary(max_size=100),
                     st.sampled_from([TRAILER, b"", TRAILER[:-1]])).map(lambda t: b"".join(t))


@given(queue_file_like())
def test_queue_file_reader(raw: bytes) -> None:
    with contextlib.suppress(CorruptQueueFile):
        parse_header(io.BytesIO(raw), len(raw), "fuzz")


@given(st.text(max_size=300))
def test_smtp_reply_parser(text: str) -> None:
    with contextlib.suppress(ProtocolError):
        parse_reply_line(text.encode("utf-8", "surrogatepass"))


@given(st.text(max_size=200), st.sampled_from([MAIL_PARAMETERS, RCPT_PARAMETERS]))
def test_dsn_parameters(arg: str, names: tuple[str, ...]) -> None:
    try:
        _rest, found = split_parameters(arg, names)
    except DsnSyntaxError:
        return
    assert all(p.split("=", 1)[0] in names for p in found)


@given(st.one_of(st.none(), st.text(max_size=200)))
def test_atrn_argument(arg: str | None) -> None:
    try:
        domains = parse_atrn_argument(arg)
    except AccountsError:
        return
    assert domains is None or all(d == d.lower() for d in domains)


@given(st.text(max_size=200))
def test_reply_rewriting(reply: str) -> None:
    with_enhanced_code(reply)


@given(json_values)
def test_accounts_file(data: Any) -> None:
    with contextlib.suppress(AccountsError):
        Accounts.from_data(data if isinstance(data, dict) else {"version": 1, "domains": data})


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=4),
       st.dictionaries(st.text(max_size=30).map(lambda k: "ODMR_BRIDGE_" + k.upper()),
                       st.text(max_size=20), max_size=3))
def test_configuration(data: dict[str, Any], env: dict[str, str]) -> None:
    with contextlib.suppress(ConfigError):
        build(data, env)


@given(st.binary(max_size=200), st.text(max_size=80))
def test_cram_md5_response(challenge: bytes, response: str) -> None:
    assert cram.verify(cram.derive(b"secret"), challenge, response) in (True, False)


@given(st.text(max_size=200))
def test_scram_client_messages(first: str) -> None:
    stored = sasl.derive_credentials(b"secret")["scram-sha-256"]
    server = sasl.scram_server(lambda user: sasl.scram_auth_info(stored))
    try:
        server.set_client_first(first)
        server.get_server_first()
        server.set_client_final(first)
    except (scramp.ScramException, ValueError):
        pass


@given(st.text(max_size=120))
def test_stored_scram_credential(text: str) -> None:
    with contextlib.suppress(ValueError):
        sasl.scram_auth_info(text)

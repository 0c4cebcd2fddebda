"""Fuzzing: parsers and decoders fed arbitrary input raise only their own errors.

CI runs a short pass; `scripts/fuzz [MINUTES]` runs the same properties for
as long as asked (default 10 minutes) with the "fuzz" Hypothesis profile.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import io
import json
import os
from typing import Any

import scramp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from odmr_bridge import bounce, cram, sasl
from odmr_bridge.accounts import Accounts, AccountsError
from odmr_bridge.config import ConfigError, build
from odmr_bridge.dsn import MAIL_PARAMETERS, RCPT_PARAMETERS, DsnSyntaxError, split_parameters
from odmr_bridge.odmr import parse_atrn_argument, with_enhanced_code
from odmr_bridge.smtp_client import ProtocolError, parse_reply_line
from odmr_bridge.spool import (
    DELIVERED,
    FAILED,
    MAGIC,
    PENDING,
    TRAILER,
    CorruptQueueFile,
    Envelope,
    Recipient,
    parse_header,
)

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


addresses = st.from_regex(r"\A[a-z0-9.+-]{1,10}@[a-z0-9.-]{1,12}\Z")
recipient_states = st.sampled_from([FAILED, PENDING, DELIVERED])


@given(st.binary(max_size=600), st.lists(st.tuples(addresses, st.text(max_size=60),
                                                   st.lists(st.text(max_size=30), max_size=3)),
                                         min_size=1, max_size=3),
       recipient_states, st.lists(st.text(max_size=30), max_size=3), st.integers(0, 1000))
def test_bounce_builder(original: bytes, rcpts: list[tuple[str, str, list[str]]], state: str,
                        mail_options: list[str], size_limit: int) -> None:
    """Whatever the original message and the recorded replies, a notice is built
    and parses back as a multipart/report (the sender's client must read it)."""
    notice = Envelope(qid="25XQYNF0NHQW54RM", domain="atrn.example", sender="s@x.test",
                      arrival=1.0e9, size=len(original), about="25XQYNF0NHQW54RN",
                      recipients=[Recipient(a, options, state, reason)
                                  for a, reason, options in rcpts],
                      mail_options=mail_options)
    raw = bounce.build(notice, io.BytesIO(original),
                       bounce.ReportSettings("provider.test", 5 * 86400.0, size_limit), 1.0e9)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert len(list(parsed.iter_parts())) == 3

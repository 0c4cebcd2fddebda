"""`odmr-bridge domain ...`: the seed's script done right (idempotent, can modify)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from odmr_bridge.accounts import Accounts, AccountsError, AccountsFile, normalize_domain
from tests.peers import Bridge


@pytest.fixture
def cli(tmp_path: Path) -> Bridge:
    return Bridge(tmp_path, "unix:///nonexistent")  # domain commands never touch Redis


def test_add_creates_domain_and_user_with_password_from_stdin(cli: Bridge) -> None:
    result = cli.cli("domain", "add", "Atrn.Example", "--user", "cust", stdin="pw-1\n")
    assert "added ATRN domain" in result.stdout
    accounts = Accounts.load(cli.accounts)
    assert accounts.may_collect("cust", "atrn.example")
    text = cli.accounts.read_text()
    assert "pw-1" not in text and "{CRAM-MD5}" in text
    assert stat.S_IMODE(cli.accounts.stat().st_mode) == 0o600


def test_adding_an_existing_domain_fails_and_names_domain_set(cli: Bridge) -> None:
    cli.add_domain("atrn.example", "cust", "pw-1")
    before = cli.accounts.read_bytes()
    result = cli.cli("domain", "add", "atrn.example", "--user", "x", stdin="pw\n", check=False)
    assert result.returncode == 1
    assert "odmr-bridge domain set" in result.stderr
    assert cli.accounts.read_bytes() == before


def test_set_modifies_users_and_passwords(cli: Bridge) -> None:
    cli.add_domain("atrn.example", "cust", "pw-1")
    old = json.loads(cli.accounts.read_text())["users"]["cust"]
    cli.cli("domain", "set", "atrn.example", "--add-user", "second", stdin="pw-2\n")
    assert Accounts.load(cli.accounts).domains["atrn.example"] == ("cust", "second")
    cli.cli("domain", "set", "atrn.example", "--user", "cust", "--password", stdin="pw-3\n")
    data = json.loads(cli.accounts.read_text())
    assert data["domains"]["atrn.example"]["users"] == ["cust"]
    assert "second" not in data["users"]  # no domain left for it
    assert data["users"]["cust"] != old


def test_set_on_a_missing_domain_names_domain_add(cli: Bridge) -> None:
    result = cli.cli("domain", "set", "nope.example", "--user", "u", stdin="p\n", check=False)
    assert result.returncode == 1 and "odmr-bridge domain add" in result.stderr


def test_list_and_remove(cli: Bridge) -> None:
    cli.add_domain("b.example", "cust", "pw")
    cli.cli("domain", "add", "a.example", "--user", "cust")  # existing user: no password read
    assert cli.cli("domain", "list").stdout == "a.example\tcust\nb.example\tcust\n"
    cli.cli("domain", "remove", "a.example")
    assert cli.cli("domain", "list").stdout == "b.example\tcust\n"
    result = cli.cli("domain", "remove", "a.example", check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_password_never_comes_from_argv(cli: Bridge) -> None:
    result = cli.cli("domain", "add", "a.example", "--user", "cust", "--password", "x",
                     check=False)
    assert result.returncode == 2  # argparse: no such option


def test_new_user_needs_a_password(cli: Bridge) -> None:
    result = cli.cli("domain", "add", "a.example", "--user", "cust", stdin="", check=False)
    assert result.returncode == 1 and "empty password" in result.stderr


@pytest.mark.parametrize("bad", ["", "nodot", "-bad.example", "a..example", "x" * 64 + ".com"])
def test_bad_domain_names_are_refused(bad: str) -> None:
    with pytest.raises(AccountsError):
        normalize_domain(bad)


def test_idn_domains_are_stored_as_a_labels(tmp_path: Path) -> None:
    store = AccountsFile(tmp_path / "c.json")
    store.add_domain("Bücher.Example", ["cust"], {"cust": b"pw"})
    assert list(store.read().domains) == ["xn--bcher-kva.example"]

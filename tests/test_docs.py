"""The documentation stays true: the man page is the parser's, links lead somewhere,
every command the guides show exists, and Exim's customer config is what the README shows.

Fast and offline: no Redis, no network.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from odmr_bridge.cli import build_parser
from tests.conftest import need

ROOT = Path(__file__).resolve().parent.parent
MAN_PAGE = ROOT / "docs" / "odmr-bridge.8"
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "RESULTS.md"]
CUSTOMER_CONF = ROOT / "contrib" / "exim" / "atrn-customer.conf"
EXIM = ROOT / ".cache" / "exim" / "root" / "usr" / "sbin" / "exim4"


# -- the parser, walked ------------------------------------------------------

def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


Command = tuple[tuple[str, ...], argparse.ArgumentParser]


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[Command]:
    """Every (sub)command path, e.g. ("queue", "list"), with its parser."""
    for name, sub in subparsers(parser).items():
        yield (*path, name), sub
        yield from commands(sub, (*path, name))


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def roff_to_text(roff: str) -> str:
    """Enough of troff to search the page as a reader sees it."""
    text = roff.replace("\\-", "-")
    return re.sub(r"\\f[BIRP]|\\[,/]", "", text)


# -- (a), (b): the manual page ------------------------------------------------

def test_the_man_page_is_exactly_what_scripts_manpage_makes_from_the_parser() -> None:
    regenerated = subprocess.run([sys.executable, str(ROOT / "scripts" / "manpage"), "-"],
                                 capture_output=True, text=True, check=True, timeout=60,
                                 env={**os.environ, "COLUMNS": "132"})
    assert regenerated.stdout == MAN_PAGE.read_text(), (
        "docs/odmr-bridge.8 is stale: run scripts/manpage and commit the page")


def test_the_man_page_is_section_8_and_names_the_program() -> None:
    page = MAN_PAGE.read_text()
    assert page.startswith('.TH ODMR\\-BRIDGE "8" ')
    assert "\n.SH NAME\nodmr\\-bridge \\- " in page


def test_the_man_page_documents_every_subcommand_and_option() -> None:
    text = roff_to_text(MAN_PAGE.read_text())
    for path, parser in commands(build_parser()):
        assert f"odmr-bridge {' '.join(path)}" in text, path
        for option in option_strings(parser) - {"-h", "--help"}:
            assert option in text, (path, option)
    for option in ("--config", "--version"):
        assert option in text


# -- (c): links ---------------------------------------------------------------

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    body = FENCE.sub("", markdown.read_text())
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", body, re.MULTILINE)}


def relative_links(markdown: Path) -> Iterator[str]:
    for target in LINK.findall(FENCE.sub("", markdown.read_text())):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(guide: Path) -> None:
    for target in relative_links(guide):
        path, _, anchor = target.partition("#")
        destination = (guide.parent / path).resolve() if path else guide
        assert destination.exists(), f"{guide.name}: {target} does not exist"
        if anchor and destination.suffix == ".md":
            assert anchor in anchors(destination), f"{guide.name}: no heading for {target}"


def test_the_readme_leads_to_every_reference_page() -> None:
    linked = {target.partition("#")[0] for target in relative_links(ROOT / "README.md")}
    for page in ("configuration.md", "protocol.md", "operations.md", "design.md"):
        assert f"docs/{page}" in linked
    assert "bench/RESULTS.md" in linked


# -- (d): commands shown in the guides ----------------------------------------

def code_in(markdown: str) -> Iterator[str]:
    """Lines of code: fenced blocks and `inline spans`."""
    for block in FENCE.findall(markdown):
        yield from block.replace("\\\n", " ").splitlines()[1:-1]
    yield from re.findall(r"`([^`\n]+)`", FENCE.sub("", markdown))


def invocations(markdown: str) -> Iterator[list[str]]:
    """The words after each `odmr-bridge` that starts a command, up to a comment or pipe."""
    for line in code_in(markdown):
        words = line.split()
        for i, word in enumerate(words):
            if word != "odmr-bridge":
                continue
            rest: list[str] = []
            for token in words[i + 1:]:
                if token.startswith("#") or token == "|":
                    break
                rest.append(token)
            yield rest


def check_invocation(words: list[str]) -> None:
    parser = build_parser()
    words = list(words)
    while words and words[0] in ("-c", "--config"):
        words = words[2:]
    shown = " ".join(words)
    while words and subparsers(parser):
        word = words[0]
        if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
            return  # a placeholder (`odmr-bridge domain ...`), or not a command at all
        assert word in subparsers(parser), f"odmr-bridge {shown}: no subcommand {word!r}"
        parser = subparsers(parser)[word]
        words = words[1:]
    known = option_strings(parser)
    for word in words:
        option = word.strip("[]").split("=")[0]
        if option.startswith("--"):
            assert option in known, f"odmr-bridge {shown}: no option {option}"


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_odmr_bridge_command_in_the_guides_exists(guide: Path) -> None:
    shown = list(invocations(guide.read_text()))
    if guide.name == "README.md":
        assert len(shown) >= 8  # the guide does show commands
    for words in shown:
        check_invocation(words)


def test_the_command_check_would_catch_a_wrong_command() -> None:
    with pytest.raises(AssertionError):
        check_invocation(["queue", "flush"])
    with pytest.raises(AssertionError):
        check_invocation(["domain", "add", "a.example", "--password-file", "x"])
    check_invocation(["-c", "/etc/odmr-bridge/odmr-bridge.toml", "serve"])


# -- Exim 4.99 as the customer --------------------------------------------------

def config_lines(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines()
            if line.split("#")[0].strip()]


def test_the_exim_customer_router_is_restricted_to_the_atrn_callout() -> None:
    lines = config_lines(CUSTOMER_CONF.read_text())
    router = lines[lines.index("odmr_provider:") + 1:lines.index("begin transports")]
    assert "driver = manualroute" in router
    assert "condition = ${if eq {$atrn_mode}{C}}" in router
    # Without it the router also catches `verify = recipient` once the line is turned.
    assert "local_parts = _atrn" in router
    assert "hosts_require_auth = *" in lines
    assert "driver = cram_md5" in lines


def test_the_readme_shows_the_exim_customer_config_as_it_is_in_contrib() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in FENCE.findall(readme) if "atrn_mode" in b]
    assert len(blocks) == 1
    shown = config_lines("\n".join(blocks[0].splitlines()[1:-1]))
    assert set(shown) <= set(config_lines(CUSTOMER_CONF.read_text()))


def test_exims_parser_accepts_the_customer_config(tmp_path: Path) -> None:
    """With the unpacked Exim (4.96, no ATRN yet), only the syntax is checked."""
    if not EXIM.exists():
        need(str(EXIM))  # scripts/fetch-exim unpacks it
    libs = ":".join(str(d) for d in sorted(EXIM.parents[2].glob("**/lib/*-linux-gnu")))
    config = tmp_path / "exim.conf"
    config.write_text(f"exim_path = {EXIM}\nprimary_hostname = customer.test\n"
                      f"spool_directory = {tmp_path}\nkeep_environment = LD_LIBRARY_PATH\n"
                      + CUSTOMER_CONF.read_text())
    result = subprocess.run([str(EXIM), "-C", str(config), "-bV"], capture_output=True,
                            env={**os.environ, "LD_LIBRARY_PATH": libs}, timeout=60)
    assert result.returncode == 0, result.stderr

"""DSN parameters (RFC 3461) carried from intake to the customer.

The host MTA hands us ``RET=``/``ENVID=`` on MAIL and ``NOTIFY=``/``ORCPT=``
on RCPT when we advertise DSN; we keep them (original case: ENVID and ORCPT
are xtext) and pass them on when the customer's MTA offers DSN.
"""

from __future__ import annotations

import re

MAIL_PARAMETERS = ("RET", "ENVID")
RCPT_PARAMETERS = ("NOTIFY", "ORCPT")

_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+$")
_NOTIFY_WORDS = {"SUCCESS", "FAILURE", "DELAY"}


class DsnSyntaxError(ValueError):
    """A DSN parameter is malformed; the message names it."""


def _valid(name: str, value: str) -> bool:
    if name == "RET":
        return value.upper() in ("FULL", "HDRS")
    if name == "NOTIFY":
        words = value.upper().split(",")
        return words == ["NEVER"] or (bool(words) and set(words) <= _NOTIFY_WORDS
                                      and len(set(words)) == len(words))
    if name == "ORCPT":
        kind, semicolon, address = value.partition(";")
        return bool(semicolon and kind and _XTEXT.match(address))
    return bool(_XTEXT.match(value)) and len(value) <= 100  # ENVID


def split_parameters(arg: str, names: tuple[str, ...]) -> tuple[str, list[str]]:
    """Take the DSN parameters *names* out of a MAIL/RCPT argument.

    Returns the argument without them and the parameters as ``NAME=value``
    (name upper-cased, value as sent).  Raises DsnSyntaxError.
    """
    kept: list[str] = []
    found: list[str] = []
    seen: set[str] = set()
    for word in arg.split(" "):
        name, eq, value = word.partition("=")
        key = name.upper()
        if eq and key in names:
            if key in seen or not _valid(key, value):
                raise DsnSyntaxError(f"bad {key} parameter")
            seen.add(key)
            found.append(f"{key}={value.upper() if key in ('RET', 'NOTIFY') else value}")
        else:
            kept.append(word)
    return " ".join(kept), found


def parameter(options: list[str], name: str) -> str | None:
    """The value of ``name=`` among *options*, or None."""
    prefix = name + "="
    for option in options:
        if option.startswith(prefix):
            return option[len(prefix):]
    return None


def notify_wants(options: list[str], event: str) -> bool:
    """Does a recipient's NOTIFY ask for a notice of *event* (SUCCESS, FAILURE, DELAY)?

    Without NOTIFY (RFC 3461 section 4.1): failures and delays are reported,
    successes are not; ``NOTIFY=NEVER`` asks for nothing.
    """
    notify = parameter(options, "NOTIFY")
    if notify is None:
        return event in ("FAILURE", "DELAY")
    return event in notify.upper().split(",")


def xtext_decode(value: str) -> str:
    """RFC 3461 section 4: ``+XX`` hex escapes back to characters."""
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)

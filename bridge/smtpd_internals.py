"""Every use of aiosmtpd's non-public parts, in one place.

aiosmtpd (1.4) has no public way to do these; an aiosmtpd release may move
any of them, and ``tests/test_smtpd_internals.py`` fails when the installed
one no longer has what is used here.  Nothing else in the bridge touches an
underscore name of aiosmtpd's.

- the per-connection streams (``_reader``/``_writer``): DATA is read in large
  pieces (intake), and the ODMR connection is handed to the relay;
- the transaction resets (``_set_rset_state``, ``_set_post_data_state``) and
  the handler-hook call (``_call_handler_hook``) around our own DATA loop;
- the idle timer (``_timeout_handle``), stopped when the relay takes over
  with its own RFC 5321 timeouts;
- whether STARTTLS ran (``_tls_protocol``);
- the address parser (``_getaddr``), which the intake replaces for plain
  ``<local@domain>`` addresses (its general parser is the costliest step);
- the limit on unrecognised commands (module global ``BOGUS_LIMIT``), which
  would disconnect a client before our own ``odmr.max_bad_commands``;
- the wording of aiosmtpd's own error replies, which are given enhanced
  status codes on the way out.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP

# Replies aiosmtpd writes itself (its _handle_client and smtp_* methods),
# recognised by their words.
LINE_TOO_LONG_TEXT = "too long"
UNRECOGNIZED_TEXT = "not recognized"


def disable_unrecognized_command_limit() -> None:
    """Leave counting bad commands to the bridge (one limit, answered with 421 4.7.0).

    aiosmtpd reads this global when a connection starts; without this it says
    ``502 ... goodbye`` and disconnects after five unrecognised commands.
    """
    aiosmtpd.smtp.BOGUS_LIMIT = sys.maxsize


def streams(server: SMTP) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return server._reader, server._writer


def reset_transaction(server: SMTP) -> None:
    """RSET's state change, as EHLO does it (RFC 5321 4.1.4)."""
    server._set_rset_state()  # type: ignore[no-untyped-call]


def end_data(server: SMTP) -> None:
    """The state after DATA, successful or not: a new transaction may begin."""
    server._set_post_data_state()  # type: ignore[no-untyped-call]


async def call_data_hook(server: SMTP) -> Any:
    """The handler's ``handle_DATA``, called as aiosmtpd calls it."""
    return await server._call_handler_hook("DATA")


def stop_idle_timer(server: SMTP) -> None:
    handle: asyncio.TimerHandle | None = server._timeout_handle
    if handle is not None:
        handle.cancel()


def started_tls(server: SMTP) -> bool:
    """STARTTLS ran on this connection."""
    return getattr(server, "_tls_protocol", None) is not None


class AddressParser(SMTP):
    """A hook for the address parser behind MAIL FROM and RCPT TO."""

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        """``<address> params`` -> (address, the rest); aiosmtpd's parser."""
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return self.parse_address(arg)

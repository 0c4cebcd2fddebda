"""What odmr_bridge.smtpd_internals relies on in aiosmtpd is still there.

aiosmtpd offers no public way to do what that module does; when an aiosmtpd
release moves any of it, these fail by name instead of the bridge failing in
the field.
"""

from __future__ import annotations

import asyncio
import inspect

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP

from odmr_bridge import replies, smtpd_internals
from odmr_bridge.odmr import with_enhanced_code
from tests.peers import Bridge
from tests.wire import Wire


def test_the_private_methods_used_are_there_with_their_signatures() -> None:
    for name, parameters in (("_set_rset_state", ["self"]),
                             ("_set_post_data_state", ["self"]),
                             ("_call_handler_hook", ["self", "command", "args"]),
                             ("_getaddr", ["self", "arg"])):
        method = getattr(SMTP, name)
        assert list(inspect.signature(method).parameters) == parameters, name


async def test_the_private_attributes_used_are_set_by_a_connection() -> None:
    server = SMTP(object())
    assert server._timeout_handle is None and not smtpd_internals.started_tls(server)
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    _, client = await asyncio.open_connection(*listener.sockets[0].getsockname()[:2])
    try:
        server.connection_made(client.transport)
        reader, writer = smtpd_internals.streams(server)
        assert isinstance(reader, asyncio.StreamReader)
        assert isinstance(writer, asyncio.StreamWriter)
        assert isinstance(server._timeout_handle, asyncio.TimerHandle)
        smtpd_internals.stop_idle_timer(server)
        assert server._timeout_handle.cancelled()
        server.connection_lost(None)
    finally:
        client.close()
        listener.close()


def test_the_unrecognized_command_limit_is_the_global_read_per_connection() -> None:
    source = inspect.getsource(SMTP._handle_client)
    assert "BOGUS_LIMIT" in source
    smtpd_internals.disable_unrecognized_command_limit()
    assert aiosmtpd.smtp.BOGUS_LIMIT > 10**6


def test_aiosmtpds_own_replies_still_read_as_we_map_them() -> None:
    source = inspect.getsource(SMTP)
    assert "500 Command line too long" in source
    assert 'command "{command}" not recognized' in source
    assert with_enhanced_code("500 Command line too long") == replies.LINE_TOO_LONG
    assert with_enhanced_code('500 Error: command "FOO" not recognized') == replies.UNRECOGNIZED


def test_one_limit_on_bad_commands_ours_answered_421_and_logged(bridge: Bridge) -> None:
    w = Wire(bridge.odmr_port)
    assert w.reply()[0] == 220
    answers = [w.command(f"BOGUS{n}") for n in range(9)]
    assert {(code, lines[0]) for code, lines in answers} == {
        (500, replies.UNRECOGNIZED[4:])}  # no "502 ... goodbye" after five
    code, lines = w.command("BOGUS9")
    assert (code, lines[0]) == (500, replies.UNRECOGNIZED[4:])
    assert w.reply() == (421, [replies.TOO_MANY_ERRORS[4:]])
    assert w.read_line() == b""
    assert bridge.logged("too many errors (10); disconnecting")

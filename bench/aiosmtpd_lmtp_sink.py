#!/usr/bin/env python3
"""The required stack's floor: an aiosmtpd LMTP server that keeps nothing.

``python bench/aiosmtpd_lmtp_sink.py PORT`` listens on 127.0.0.1:PORT and
answers every recipient of every message with 250, one line per recipient
(RFC 2033), having stored nothing and logged nothing.  bench/intake measures
Postfix delivering to it beside smtp-sink and the bridge: what aiosmtpd on
CPython costs before the bridge does any work of its own (no file, no fsync,
no Redis, no log line).
"""

from __future__ import annotations

import asyncio
import sys

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope, Session


class Discard:
    async def handle_EHLO(self, server: LMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        # What the bridge offers too (RFC 2033 requires both), so Postfix
        # pipelines to the floor as it does to the bridge.
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES",
                responses[-1]]

    async def handle_DATA(self, server: LMTP, session: Session, envelope: Envelope) -> str:
        return "\r\n".join("250 2.0.0 Ok" for _ in envelope.rcpt_tos)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: LMTP(Discard(), hostname="floor.bench"),
                                      "127.0.0.1", port, backlog=1000)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))

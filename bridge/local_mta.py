"""The customer's own MTA, as ``odmr-bridge fetch`` talks to it: one persistent
SMTP or LMTP client connection (TCP or unix socket), pipelined when offered.

Opened before ``ATRN`` so that a local MTA that is down costs the provider
nothing: the mail stays held there.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from odmr_bridge.fetch_config import LocalMtaSettings
from odmr_bridge.smtp_client import Extensions, ProtocolError, Reply, read_reply

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def quickack(writer: asyncio.StreamWriter) -> None:
    """Re-arm TCP_QUICKACK before a read: a delayed ACK would stall the peer's next
    small write behind Nagle's algorithm (the stall that caps fetchmail)."""
    sock = writer.get_extra_info("socket")
    if _QUICKACK is not None and sock is not None and sock.family != socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


class LocalMtaError(Exception):
    """The local MTA cannot be reached or will not talk; nothing was collected."""


class LocalMta:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 settings: LocalMtaSettings, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.settings = settings
        self.timeout = timeout
        self.extensions = Extensions()

    @property
    def lmtp(self) -> bool:
        return self.settings.protocol == "lmtp"

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @classmethod
    async def open(cls, settings: LocalMtaSettings, hostname: str,
                   timeout: float) -> LocalMta:
        """Connect, read the 220, EHLO (LHLO for LMTP); LocalMtaError if any step fails."""
        where = settings.describe()
        try:
            async with asyncio.timeout(timeout):
                if isinstance(settings.address, str):
                    reader, writer = await asyncio.open_unix_connection(
                        settings.address, limit=1 << 20)
                else:
                    host, port = settings.address
                    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
                    sock = writer.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, TimeoutError) as exc:
            raise LocalMtaError(f"local MTA {where} unreachable: {exc}") from None
        mta = cls(reader, writer, settings, timeout)
        try:
            greeting = await mta.reply()
            if greeting.code != 220:
                raise LocalMtaError(f"local MTA {where} greeting: {greeting}")
            hello = await mta.command(f"{'LHLO' if mta.lmtp else 'EHLO'} {hostname}")
            if hello.kind != 2 and not mta.lmtp:
                hello = await mta.command(f"HELO {hostname}")
            if hello.kind != 2:
                raise LocalMtaError(f"local MTA {where} refused our hello: {hello}")
            mta.extensions = Extensions.from_ehlo(hello)
        except (OSError, TimeoutError, ProtocolError) as exc:
            mta.abort()
            raise LocalMtaError(f"local MTA {where}: {exc}") from None
        except LocalMtaError:
            mta.abort()
            raise
        return mta

    def send(self, data: bytes) -> None:
        """Buffered; written out at the next :meth:`drain`."""
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def reply(self, timeout: float | None = None) -> Reply:
        quickack(self.writer)
        return await read_reply(self.reader, timeout or self.timeout)

    async def command(self, line: str) -> Reply:
        self.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        await self.drain()
        return await self.reply()

    async def quit(self) -> None:
        with contextlib.suppress(OSError, TimeoutError, ProtocolError):
            await self.command("QUIT")
        self.abort()

    def abort(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()

"""Domain leases: one ATRN session collects a domain at a time.

A lease is an expiring Redis key holding the session's token
(``SET NX PX``), renewed while the session runs and released with a
compare-and-delete script, so a crashed session's lease simply expires.
A daemon's tokens name their node (:class:`NodeIdentity`), so a node that
restarts frees the leases its dead sessions held at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import secrets
import socket
from pathlib import Path

from odmr_bridge.index import Index

log = logging.getLogger("odmr_bridge.leases")
RELEASE_TIMEOUT = 2.0
NODE_ID_FILE = "node-id"


class NodeIdentity:
    """This instance's name, the same across its restarts:
    ``<hostname>/<spool id>/<slot>``, held for the life of the process.

    The spool id is made once and kept in the spool directory, written
    durably.  The slot is the first ``node-<n>.lock`` in it that no live
    process holds (``flock``): a second instance on the same spool and host
    takes another slot, and a slot is free only once its holder is dead, so
    freeing the leases named after it never touches a live session's.
    """

    def __init__(self, name: str, lock: int) -> None:
        self.name = name
        self._lock = lock

    @classmethod
    def take(cls, spool_root: Path) -> NodeIdentity:
        spool_id = _spool_id(spool_root)
        for slot in itertools.count():
            fd = os.open(spool_root / f"node-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return cls(f"{socket.gethostname()}/{spool_id}/{slot}", fd)
        raise AssertionError("unreachable")

    @property
    def spool(self) -> str:
        """``<hostname>/<spool id>``: this spool on this host, whatever the slot."""
        return self.name.rsplit("/", 1)[0]

    def release(self) -> None:
        os.close(self._lock)


def _spool_id(spool_root: Path) -> str:
    path = spool_root / NODE_ID_FILE
    if not path.exists():
        temporary = spool_root / f".{NODE_ID_FILE}.{os.getpid()}"
        with open(temporary, "w") as handle:
            handle.write(secrets.token_hex(8) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)  # the first of two racing starts wins
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
        directory = os.open(spool_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return path.read_text().strip()


class LeaseKeeper:
    """Holds one ATRN lease per domain and renews them while the session runs."""

    def __init__(self, index: Index, ttl: float) -> None:
        self.index = index
        self.ttl = ttl
        self.token = index.new_token()
        self.domains: list[str] = []
        self.lost = False
        self._task: asyncio.Task[None] | None = None

    async def acquire(self, domains: list[str]) -> bool:
        for domain in domains:
            if not await self.index.acquire(domain, self.token, self.ttl):
                await self.release()
                return False
            self.domains.append(domain)
        self._task = asyncio.create_task(self._renew())
        return True

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            for domain in self.domains:
                if not await self.index.renew(domain, self.token, self.ttl):
                    log.warning("lease on %s lost; stopping delivery", domain)
                    self.lost = True
                    return

    async def release(self) -> None:
        """Best effort: a lease not released here expires after its TTL anyway."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for domain in self.domains:
            try:
                async with asyncio.timeout(RELEASE_TIMEOUT):
                    await self.index.release(domain, self.token)
            except Exception as exc:
                log.warning("lease on %s not released (%s); it expires by itself",
                            domain, type(exc).__name__)
        self.domains = []

"""Group commit: work that arrives while a commit is being made goes in the next one.

Postfix hands the bridge up to 20 messages at once.  Each must be on stable
storage and indexed before its 250, but they need not pay for that one by
one: while one batch is being made durable (its files written and fsynced,
one directory fsync, its index entries written), the messages that finish
arriving meanwhile wait and form the next batch.  A lone message goes at
once (no waiting window); under load each fsync of the directory and each
thread hop is shared.  Every caller learns its own batch's outcome: nobody
is answered before the batch holding their message is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupCommit(Generic[T]):
    def __init__(self, commit: Callable[[list[T]], Awaitable[None]]) -> None:
        self._commit = commit
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._running: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> None:
        """Return once *item* is committed (with others); raise if its batch failed."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._run())
        await asyncio.shield(done)  # a lost client must not cancel the others' batch

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await self._commit([item for item, _ in batch])
            except BaseException as exc:  # every member answers 4xx; nothing half-kept
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

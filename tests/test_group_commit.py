"""Group commit: intakes that finish while a batch is being made durable share the next one,
and nobody is answered before their own batch is done."""

from __future__ import annotations

import asyncio

import pytest

from odmr_bridge.group_commit import GroupCommit


class Recorder:
    def __init__(self, fail_batch: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_batch = fail_batch
        self.release = asyncio.Event()

    async def commit(self, items: list[int]) -> None:
        self.batches.append(items)
        await self.release.wait()
        if len(self.batches) - 1 == self.fail_batch:
            raise OSError("disk full")


async def test_a_lone_commit_goes_at_once() -> None:
    recorder = Recorder()
    recorder.release.set()
    await GroupCommit(recorder.commit)(1)
    assert recorder.batches == [[1]]


async def test_commits_arriving_during_a_batch_form_the_next_one() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.commit)
    first = asyncio.create_task(group(1))
    await asyncio.sleep(0)  # the first batch is being made
    others = [asyncio.create_task(group(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    assert not first.done() and recorder.batches == [[1]]
    recorder.release.set()
    await asyncio.gather(first, *others)
    assert recorder.batches == [[1], [2, 3, 4]]


async def test_a_failed_batch_fails_its_members_only() -> None:
    recorder = Recorder(fail_batch=1)
    group = GroupCommit(recorder.commit)
    first = asyncio.create_task(group(1))
    await asyncio.sleep(0)
    second, third = asyncio.create_task(group(2)), asyncio.create_task(group(3))
    await asyncio.sleep(0)
    recorder.release.set()
    await first
    for task in (second, third):
        with pytest.raises(OSError, match="disk full"):
            await task
    recorder.fail_batch = None
    await group(4)  # the next batch is unaffected
    assert recorder.batches[-1] == [4]


async def test_a_caller_that_goes_away_does_not_cancel_the_batch() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.commit)
    leaving = asyncio.create_task(group(1))
    await asyncio.sleep(0)
    staying = asyncio.create_task(group(2))
    await asyncio.sleep(0)
    leaving.cancel()
    recorder.release.set()
    await staying
    assert recorder.batches == [[1], [2]]

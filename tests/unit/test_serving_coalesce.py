"""Coalescer: calls of one loop iteration become one batch; callers stay independent."""

from __future__ import annotations

import asyncio

import pytest

from featureplane.serving.coalesce import Coalescer


class Recorder:
    def __init__(self, *, fail: bool = False, none: bool = False, delay: float = 0) -> None:
        self.calls: list[list[str]] = []
        self.fail, self.none, self.delay = fail, none, delay

    async def __call__(self, keys: list[str]) -> list[str] | None:
        self.calls.append(keys)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("down")
        return None if self.none else [k.upper() for k in keys]


async def test_concurrent_calls_share_one_deduplicated_batch() -> None:
    fn = Recorder()
    c: Coalescer[str, str] = Coalescer(fn)
    got = await asyncio.gather(c(["a", "b"]), c(["b"]), c(["c", "a"]))
    assert got == [["A", "B"], ["B"], ["C", "A"]]
    assert fn.calls == [["a", "b", "c"]]


async def test_sequential_calls_are_separate_batches() -> None:
    fn = Recorder()
    c: Coalescer[str, str] = Coalescer(fn)
    assert await c(["a"]) == ["A"]
    assert await c(["b"]) == ["B"]
    assert fn.calls == [["a"], ["b"]]


async def test_max_batch_splits() -> None:
    fn = Recorder()
    c: Coalescer[str, str] = Coalescer(fn, max_batch=2)
    got = await asyncio.gather(c(["a"]), c(["b"]), c(["c"]))
    assert got == [["A"], ["B"], ["C"]]
    assert fn.calls == [["a", "b"], ["c"]]


async def test_none_and_errors_reach_every_caller() -> None:
    c: Coalescer[str, str] = Coalescer(Recorder(none=True))
    assert await asyncio.gather(c(["a"]), c(["b"])) == [None, None]
    c = Coalescer(Recorder(fail=True))
    results = await asyncio.gather(c(["a"]), c(["b"]), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_a_cancelled_caller_does_not_cancel_the_batch() -> None:
    fn = Recorder(delay=0.05)
    c: Coalescer[str, str] = Coalescer(fn)
    impatient = asyncio.create_task(asyncio.wait_for(c(["a"]), 0.01))
    patient = asyncio.create_task(c(["b"]))
    with pytest.raises(TimeoutError):
        await impatient
    assert await patient == ["B"]
    assert [sorted(call) for call in fn.calls] == [["a", "b"]]
    await c.aclose()

"""The serving pieces that share work between requests, each alone: the Coalescer (calls
of one loop iteration become one batch), single-flight reads, keyed background tasks, the
fill queue and the guarded tier call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from featureplane.cache import Cached, CacheFill
from featureplane.codec import Item
from featureplane.errors import StoreError, TransientStoreError
from featureplane.serving.breaker import Breaker, BreakerState
from featureplane.serving.coalesce import Coalescer
from featureplane.serving.fills import FillQueue
from featureplane.serving.flight import Background, SingleFlight
from featureplane.serving.guarded import GuardedTier
from featureplane.serving.metrics import Metrics


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


# ---------------------------------------------------------------- single-flight


async def test_single_flight_one_leader_per_key_followers_get_its_result() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    reads: list[list[str]] = []

    async def read(keys: list[str]) -> dict[str, int | None]:
        flight = flights.begin(keys)
        results: dict[str, int] = {}
        try:
            reads.append(flight.lead)
            await asyncio.sleep(0.01)
            results = {k: len(k) for k in flight.lead}
        finally:
            flights.end(flight, results)
        return {**results, **await flight.followed()}

    got = await asyncio.gather(read(["a", "bb"]), read(["bb", "ccc"]), read(["a"]))
    assert got == [{"a": 1, "bb": 2}, {"bb": 2, "ccc": 3}, {"a": 1}]
    assert reads == [["a", "bb"], ["ccc"], []]
    assert len(flights) == 0 and flights.futures() == []


async def test_single_flight_a_failed_leader_gives_its_followers_none() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    leading = flights.begin(["k"])
    following = flights.begin(["k"])
    assert following.lead == [] and len(flights.futures()) == 1
    flights.end(leading, {})  # the read failed: no result for "k"
    assert await following.followed() == {"k": None}


async def test_single_flight_a_cancelled_follower_does_not_cancel_the_leaders_future() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    leading = flights.begin(["k"])
    impatient = asyncio.create_task(flights.begin(["k"]).followed())
    await asyncio.sleep(0)
    impatient.cancel()
    patient = asyncio.create_task(flights.begin(["k"]).followed())
    await asyncio.sleep(0)
    flights.end(leading, {"k": 7})
    assert await patient == {"k": 7}


# ---------------------------------------------------------------- background tasks


async def test_background_one_task_per_key_and_wait(caplog: pytest.LogCaptureFixture) -> None:
    tasks: Background[str] = Background("refresh")
    ran: list[str] = []
    gate = asyncio.Event()

    async def work(name: str) -> None:
        await gate.wait()
        ran.append(name)
        if name == "bad":
            raise RuntimeError("boom")

    tasks.start("k", lambda: work("first"))
    tasks.start("k", lambda: work("second"))  # "k" runs already: skipped
    tasks.start("b", lambda: work("bad"))
    assert len(tasks) == 2
    gate.set()
    with caplog.at_level(logging.ERROR):
        await tasks.wait()
    assert sorted(ran) == ["bad", "first"] and len(tasks) == 0
    assert [r.getMessage() for r in caplog.records] == ["refresh of b failed"]
    tasks.start("k", lambda: work("third"))  # done: a key runs again
    await tasks.wait()
    assert ran[-1] == "third"


async def test_background_aclose_cancels_even_tasks_not_started_yet() -> None:
    tasks: Background[str] = Background("refresh")
    tasks.start("k", lambda: asyncio.sleep(10))
    await tasks.aclose()  # cancelled before its first step
    assert len(tasks) == 0
    await asyncio.wait_for(tasks.wait(), 1)


# ---------------------------------------------------------------- guarded calls and fills


class Cache:
    """A cache tier recording fills; `down` makes fills fail, `gate` holds them."""

    def __init__(self) -> None:
        self.fills: list[list[CacheFill]] = []
        self.down = False
        self.gate: asyncio.Event | None = None

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def ping(self) -> None: ...

    async def write_through(self, items: Sequence[Item]) -> None: ...

    async def read_cached(self, keys: Sequence[tuple[str, str]]) -> list[Cached]:
        return [Cached([], None, None) for _ in keys]

    async def fill(self, fills: Sequence[CacheFill]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise TransientStoreError("down")
        self.fills.append(list(fills))


def _guard(failures: int = 2) -> GuardedTier:
    return GuardedTier("redis", Breaker(failures, 60_000, clock=lambda: 0), Metrics())


def _count(guard: GuardedTier, op: str) -> float:
    return guard.metrics.errors.labels("redis", op).get()


async def test_guarded_call_answers_none_on_failure_and_timeout_and_opens_the_breaker() -> None:
    guard = _guard(failures=2)

    async def fails() -> int:
        raise StoreError("no")

    async def slow() -> int:
        await asyncio.sleep(1)
        return 1

    async def ok() -> int:
        return 1

    assert guard.allow() and await guard.run("read", ok(), 100) == 1
    assert guard.allow() and await guard.run("read", fails(), 100) is None
    assert guard.allow() and await guard.run("read", slow(), 10) is None
    assert not guard.allow() and guard.breaker.state is BreakerState.OPEN
    assert _count(guard, "read") == 2
    assert guard.metrics.breaker.labels("redis").get() == int(BreakerState.OPEN)


async def test_guarded_call_lets_a_bug_through() -> None:
    async def bug() -> int:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await _guard().run("read", bug(), 100)


def _fill(i: int) -> CacheFill:
    return CacheFill("g", str(i), [])


async def test_fill_queue_writes_in_batches_and_drains() -> None:
    cache, guard = Cache(), _guard()
    fills = FillQueue(cache, guard, 100, batch=2)
    await fills.start()
    assert fills.settled
    cache.gate = asyncio.Event()
    for i in range(5):
        fills.put(_fill(i))
    assert not fills.settled
    await asyncio.sleep(0.01)
    assert not fills.settled  # a batch is being written: not drained yet
    cache.gate.set()
    await asyncio.wait_for(fills.drained(), 1)
    assert [[f.id for f in batch] for batch in cache.fills] == [["0", "1"], ["2", "3"], ["4"]]
    assert fills.settled and len(fills) == 0
    await fills.aclose()


async def test_fill_queue_is_bounded_and_drops_while_the_breaker_is_open() -> None:
    cache, guard = Cache(), _guard(failures=1)
    fills = FillQueue(cache, guard, 100, max_pending=3, batch=10)
    for i in range(5):
        fills.put(_fill(i))
    assert len(fills) == 3 and _count(guard, "fill_dropped") == 2
    cache.down = True
    await fills.start()
    await asyncio.wait_for(fills.drained(), 1)
    assert _count(guard, "fill") == 1 and guard.breaker.state is BreakerState.OPEN
    fills.put(_fill(9))  # breaker open: dropped without a call
    await asyncio.wait_for(fills.drained(), 1)
    assert _count(guard, "fill_dropped") == 3 and cache.fills == []
    await fills.aclose()


async def test_fill_queue_aclose_writes_one_more_batch() -> None:
    cache = Cache()
    fills = FillQueue(cache, _guard(), 100, batch=2)  # never started: nothing written
    for i in range(3):
        fills.put(_fill(i))
    await fills.aclose()
    assert [[f.id for f in batch] for batch in cache.fills] == [["0", "1"]]

"""Work done once however many ask: single-flight reads and keyed background tasks.

`SingleFlight`: concurrent reads of one key are made once. `begin(keys)` splits the keys
into those this caller leads (nobody reads them yet) and those another caller is
reading; the leader reads its keys and hands every result over in `end`, the others
await them in `Flight.followed`. A leader that fails or is cancelled still ends its
flight: its followers get None, never a hang.

`Background`: at most one task per key (a refresh of one (group, id), say), failures
logged, never raised; `wait()` returns once none is running, `aclose()` cancels them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Background", "Flight", "SingleFlight"]

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Flight(Generic[K, V]):
    """One caller's part of a single-flight read: the keys it leads, the ones it follows."""

    lead: list[K]
    mine: dict[K, asyncio.Future[V | None]]
    others: dict[K, asyncio.Future[V | None]]

    async def followed(self) -> dict[K, V | None]:
        """The results of the keys other callers read (None where their read failed)."""
        # shield: this caller being cancelled must not cancel a future others await too
        return {key: await asyncio.shield(fut) for key, fut in self.others.items()}


class SingleFlight(Generic[K, V]):
    """Concurrent reads of a key share one read."""

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Future[V | None]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def begin(self, keys: Iterable[K]) -> Flight[K, V]:
        """Claim the keys nobody reads yet; always pair with `end`, in a `finally`."""
        loop = asyncio.get_running_loop()
        others = {k: self._inflight[k] for k in keys if k in self._inflight}
        lead = [k for k in keys if k not in others]
        mine: dict[K, asyncio.Future[V | None]] = {k: loop.create_future() for k in lead}
        self._inflight.update(mine)
        return Flight(lead, mine, others)

    def end(self, flight: Flight[K, V], results: Mapping[K, V]) -> None:
        """Hand the leader's results to its followers; a key without one gets None."""
        for key, fut in flight.mine.items():
            del self._inflight[key]
            if not fut.done():
                fut.set_result(results.get(key))

    def futures(self) -> list[asyncio.Future[V | None]]:
        """The reads in flight now."""
        return list(self._inflight.values())


class Background(Generic[K]):
    """Background tasks, at most one per key at a time."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._running: dict[K, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._running)

    def start(self, key: K, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `work()` for `key` unless a task for `key` is running already."""
        if key in self._running:
            return
        task = self._running[key] = asyncio.create_task(self._run(key, work))
        # A task cancelled before its first step never runs `_run`'s finally: forget it here.
        task.add_done_callback(lambda done: self._forget(key, done))

    async def _run(self, key: K, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await work()
        except Exception:  # a background task must never die noisily
            log.exception("%s of %s failed", self.what, key)
        finally:  # at once, not a loop turn later: the next start() for `key` runs anew
            self._forget(key, asyncio.current_task())

    def _forget(self, key: K, task: asyncio.Task[Any] | None) -> None:
        if self._running.get(key) is task:
            del self._running[key]

    async def wait(self) -> None:
        """Return once no task runs (tasks started meanwhile are waited for too)."""
        while self._running:
            await asyncio.wait(list(self._running.values()))

    async def aclose(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

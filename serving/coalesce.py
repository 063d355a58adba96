"""Merge the batch calls made in one event-loop iteration into one call.

Under load many requests reach their Redis read in the same loop iteration; sending
each as its own command costs a socket write, a wake-up of Redis, a reply read and
redis-py's per-command Python work, every time. A `Coalescer` queues the keys of every
call made before the loop comes round again and sends them as one batch (deduplicated,
at most `max_batch` keys a call), then hands each caller its own slice.

Each caller waits on a future of its own, so a caller that is cancelled (its timeout)
never cancels the batch the others wait for. The batch function answers None for
"the tier failed": every caller of that batch gets None, and the failure is counted
once, by the batch function, not once per caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """`await c(keys)` -> `fn`'s values for `keys`, with concurrent calls sent together."""

    def __init__(
        self, fn: Callable[[list[K]], Awaitable[Sequence[V] | None]], max_batch: int = 256
    ) -> None:
        self.fn, self.max_batch = fn, max_batch
        self._waiting: list[tuple[list[K], asyncio.Future[list[V] | None]]] = []
        self._size = 0
        self._scheduled: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: list[K]) -> list[V] | None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[V] | None] = loop.create_future()
        self._waiting.append((keys, fut))
        self._size += len(keys)
        if self._size >= self.max_batch:
            self._flush()
        elif self._scheduled is None:
            self._scheduled = loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        waiting, self._waiting, self._size = self._waiting, [], 0
        if waiting:
            task = asyncio.get_running_loop().create_task(self._run(waiting))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, waiting: list[tuple[list[K], asyncio.Future[list[V] | None]]]) -> None:
        keys = list(dict.fromkeys(k for ks, _ in waiting for k in ks))
        try:
            values = await self.fn(keys)
        except asyncio.CancelledError:  # shutdown: the callers are cancelled with it
            for _, fut in waiting:
                fut.cancel()
            raise
        except Exception as exc:  # hand it to the callers; never lose it in a task
            for _, fut in waiting:
                if not fut.done():
                    fut.set_exception(exc)
            return
        if values is None:
            for _, fut in waiting:
                if not fut.done():
                    fut.set_result(None)
            return
        by_key = dict(zip(keys, values, strict=True))
        for ks, fut in waiting:
            if not fut.done():
                fut.set_result([by_key[k] for k in ks])

    async def aclose(self) -> None:
        """Send what is queued and wait for the batches in flight."""
        self._flush()
        await asyncio.gather(*self._tasks, return_exceptions=True)

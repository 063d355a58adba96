"""The backoff hold of the retry dataflow: records wait until due, others pass.

A record read from a retry topic with `attempt` n is due at its Kafka
timestamp (when it was handed to the retry topic) plus `backoff_ms(n - 1)`
(exponential, full jitter, capped). Records wait in a heap, so one record's
wait never holds back another that is already due; their offsets stay
unacknowledged until processed, so a crash replays them. How long a record
keeps being retried is the retry budget's business (`operators.route`).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from featureplane.backoff import backoff_ms
from featureplane.operators.records import Message

__all__ = ["Backoff", "RetryHold"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay policy of the retry dataflow."""

    base_ms: float = 1_000.0
    cap_ms: float = 60_000.0

    def delay_ms(self, attempt: int, rand: random.Random | None = None) -> float:
        """Delay before processing retry `attempt` (1-based)."""
        return backoff_ms(max(0, attempt - 1), self.base_ms, self.cap_ms, rand)


class RetryHold:
    """Messages waiting for their due time (epoch ms, from the injected clock)."""

    def __init__(
        self,
        policy: Backoff,
        clock: Callable[[], int],
        rand: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.rand = rand or random.Random()
        self._heap: list[tuple[float, int, Message]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, msg: Message, produced_ms: int) -> None:
        due = produced_ms + self.policy.delay_ms(msg.attempt, self.rand)
        heapq.heappush(self._heap, (due, next(self._seq), msg))

    def pop_due(self, limit: int) -> list[Message]:
        """Up to `limit` messages whose time has come, earliest first."""
        now = self.clock()
        out: list[Message] = []
        while self._heap and self._heap[0][0] <= now and len(out) < limit:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def next_due_ms(self) -> float | None:
        return self._heap[0][0] if self._heap else None

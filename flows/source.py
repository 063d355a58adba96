"""The Bytewax source: a consumer-group Kafka reader whose partitions commit acknowledged offsets.

Each worker builds one `GroupPartition` owning a `GroupConsumer` (all in the
same consumer group, so Kafka spreads the topic-partitions over workers and
processes). Records go downstream carrying their tracker; the stateless
steps stay on the same worker and acknowledge them there. The partition
commits in `next_batch` every `commit_interval`, on rebalance (revoked
partitions) and when it stops. When `stop` is set (SIGTERM) it reads no
more, waits for in-flight records up to `drain_timeout`, commits and ends.

With a `RetryHold` (the retry dataflow) records are held until their backoff
is over and only then emitted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from bytewax.inputs import DynamicSource, StatelessSourcePartition

from featureplane.operators.kafka import GroupConsumer
from featureplane.operators.records import Message
from featureplane.operators.retry import RetryHold

__all__ = ["GroupPartition", "GroupSource"]

log = logging.getLogger(__name__)

_IDLE = timedelta(milliseconds=10)


class GroupPartition(StatelessSourcePartition[Message]):
    """One worker's consumer."""

    def __init__(
        self,
        consumer: GroupConsumer,
        stop: threading.Event,
        *,
        batch_size: int,
        commit_interval_s: float,
        drain_timeout_s: float,
        hold: RetryHold | None = None,
        max_held: int = 50_000,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        """`on_idle`: called when a read brings nothing new (`Pipeline.flush`: the batch
        still being written is finished and acknowledged, not left for the next one)."""
        self.consumer = consumer
        self.stop = stop
        self.batch_size = batch_size
        self.commit_interval_s = commit_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.hold = hold
        self.max_held = max_held
        self.on_idle = on_idle
        self._next_commit = time.monotonic() + commit_interval_s
        self._drain_deadline: float | None = None
        self._idle = False
        self._closed = False

    def next_batch(self) -> list[Message]:
        if self._closed:
            raise StopIteration
        now = time.monotonic()
        if now >= self._next_commit:
            self.consumer.commit()
            self._next_commit = now + self.commit_interval_s
        if self.stop.is_set():
            return self._drain(now)
        messages = self.consumer.poll(self.batch_size, 0)
        if self.hold is not None:
            for m in messages:
                self.hold.push(m, m.produced_ms)
            if len(self.hold) >= self.max_held:
                self.consumer.pause()
            elif len(self.hold) < self.max_held // 2:
                self.consumer.resume()
            messages = self.hold.pop_due(self.batch_size)
        self._idle = not messages
        if self._idle and self.on_idle is not None:
            self.on_idle()
        return messages

    def _drain(self, now: float) -> list[Message]:
        if self.on_idle is not None:
            self.on_idle()
        if self._drain_deadline is None:
            self._drain_deadline = now + self.drain_timeout_s
            log.info("stopping: no more reads; waiting for records in flight")
        held = len(self.hold) if self.hold is not None else 0
        in_flight = self.consumer.in_flight() - held
        if in_flight > 0 and now < self._drain_deadline:
            return []
        if in_flight > 0:
            log.warning(
                "stopping with %d records unfinished; they are read again on restart", in_flight
            )
        self.close()
        raise StopIteration

    def next_awake(self) -> datetime | None:
        if self._idle or self.stop.is_set():
            wake = datetime.now(UTC) + _IDLE
            if self.hold is not None and (due := self.hold.next_due_ms()) is not None:
                wake = min(wake, datetime.fromtimestamp(due / 1000, UTC))
            return wake
        return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.consumer.close()
            log.info("consumer closed, acknowledged offsets committed")


class GroupSource(DynamicSource[Message]):
    """A consumer per worker, all in one group."""

    def __init__(self, build: Callable[[int, int], GroupPartition]) -> None:
        self._build = build

    def build(self, step_id: str, worker_index: int, worker_count: int) -> GroupPartition:
        return self._build(worker_index, worker_count)

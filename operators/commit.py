"""Per topic-partition offset tracking for manual commits (Karrot's contiguous commit).

Offsets are tracked in the order they are read and acknowledged in any
order; the committable position is the highest offset such that it and
every offset read before it are done, plus one (Kafka's "next offset to
read"). One slow record holds the commit back, never the stream.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence

__all__ = ["OffsetTracker"]


class OffsetTracker:
    """Tracks the read and acknowledged offsets of one topic-partition."""

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self._read: deque[int] = deque()
        self._done: set[int] = set()
        self._position: int | None = None
        self._committed: int | None = None
        self._last: int | None = None
        self._first: int | None = None
        self._lock = threading.Lock()

    def track(self, offset: int) -> None:
        """Record that `offset` was read; offsets must be read in increasing order."""
        self.track_many((offset,))

    def track_many(self, offsets: Sequence[int]) -> None:
        """`track` each of `offsets`, in order (a poll's: one lock, not one an offset)."""
        if not offsets:
            return
        with self._lock:
            last = self._last
            for offset in offsets:
                if last is not None and offset <= last:
                    raise ValueError(f"offset {offset} read after {last}")
                last = offset
            self._last = last
            if self._first is None:
                self._first = offsets[0]
            self._read.extend(offsets)

    def ack(self, offset: int) -> None:
        """Mark `offset` done and advance the committable position."""
        self.ack_many((offset,))

    def ack_many(self, offsets: Iterable[int]) -> None:
        """Mark every offset of `offsets` done (a batch's: one lock, not one an offset)."""
        with self._lock:
            self._done.update(offsets)
            read, done = self._read, self._done
            while read and read[0] in done:
                first = read.popleft()
                done.discard(first)
                self._position = first + 1

    @property
    def position(self) -> int | None:
        """The offset to commit (last contiguous done + 1), or None before any is done."""
        return self._position

    @property
    def in_flight(self) -> int:
        """Offsets read and not yet committable."""
        with self._lock:
            return len(self._read)

    @property
    def first_read(self) -> int | None:
        """The first offset read since this tracker was made (the assignment's start)."""
        return self._first

    @property
    def last_committed(self) -> int | None:
        """The position last recorded by `committed()`, or None."""
        return self._committed

    def to_commit(self) -> int | None:
        """The position if it moved since `committed()` was last called with it."""
        pos = self._position
        return None if pos is None or pos == self._committed else pos

    def committed(self, position: int) -> None:
        """Record that `position` was committed."""
        self._committed = position

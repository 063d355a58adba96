"""The in-process tier: an LRU of `freshness.Entry` bounded by bytes.

Invalidation (a write elsewhere made a key's value old) drops the key at once. A read of
the tiers below that was already under way when the invalidation came may bring back the
old value: so a reader takes a `token` before it reads, and `put` refuses a value for a
key invalidated after that token was taken.

An entry may carry answers rendered from it (`keep_rendered`): they are counted in its
size and go with it, whatever removes it (replaced, evicted, invalidated, cleared).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from featureplane.serving.freshness import Entry, Rendered

__all__ = ["LocalCache"]

Key = tuple[str, str]
_DROPPED_MAX = 65_536  # invalidated keys remembered for reads under way; then forgotten all
_RENDERED_MAX = 8  # request shapes rendered per entry: a client varying since/until fills no more


class LocalCache:
    """(group, id) -> Entry, evicting the least recently used past `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[Key, Entry] = OrderedDict()
        self._seq = 0  # bumped by every invalidation
        self._floor = 0  # a token below this is refused: its reads' keys were forgotten
        self._dropped: dict[Key, int] = {}  # key -> seq of its last invalidation

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Key) -> Entry | None:
        entry = self._data.get(key)
        if entry is not None:
            self._data.move_to_end(key)
        return entry

    def token(self) -> int:
        """Taken before reading the tiers below, and given to `put` with what was read."""
        return self._seq

    def put(self, key: Key, entry: Entry, token: int | None = None) -> None:
        """Keep `entry` for `key`, unless `key` was invalidated since `token` was taken
        (the value may predate the write that invalidated it)."""
        if token is not None and (token < self._floor or self._dropped.get(key, -1) > token):
            return
        size = entry.size
        if size > self.max_bytes:
            self.pop(key)
            return
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._data[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._data.popitem(last=False)
            self.bytes -= evicted.size

    def keep_rendered(self, key: Key, entry: Entry, shape: object, rendered: Rendered) -> None:
        """Keep an answer rendered from `entry` with it, if `entry` is still what `key`
        holds (it may have been replaced or dropped while the answer was rendered)."""
        if self._data.get(key) is not entry or len(entry.rendered) >= _RENDERED_MAX:
            return
        before = entry.size
        entry.rendered[shape] = rendered
        self.bytes += entry.size - before
        while self.bytes > self.max_bytes:
            _, evicted = self._data.popitem(last=False)
            self.bytes -= evicted.size

    def pop(self, key: Key) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= old.size

    def invalidate(self, keys: Iterable[Key]) -> None:
        """Drop `keys`: they were written elsewhere. Reads under way keep out of them."""
        if len(self._dropped) > _DROPPED_MAX:
            self._dropped.clear()
            self._floor = self._seq + 1
        self._seq = seq = self._seq + 1
        dropped, data = self._dropped, self._data
        for key in keys:
            dropped[key] = seq
            old = data.pop(key, None)
            if old is not None:
                self.bytes -= old.size

    def clear(self) -> None:
        """Drop everything (invalidations may have been missed); reads under way too."""
        self._data.clear()
        self.bytes = 0
        self._dropped.clear()
        self._seq += 1
        self._floor = self._seq

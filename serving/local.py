"""The in-process tier: an LRU of `freshness.Entry` bounded by bytes."""

from __future__ import annotations

from collections import OrderedDict

from featureplane.serving.freshness import Entry

__all__ = ["LocalCache"]

Key = tuple[str, str]


class LocalCache:
    """(group, id) -> Entry, evicting the least recently used past `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[Key, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Key) -> Entry | None:
        entry = self._data.get(key)
        if entry is not None:
            self._data.move_to_end(key)
        return entry

    def put(self, key: Key, entry: Entry) -> None:
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

    def pop(self, key: Key) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= old.size

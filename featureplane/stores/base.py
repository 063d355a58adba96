"""The async interface every store backend honours, and the read rules they share.

A backend writes many items at once; reads newest-first with `limit`,
`since`, `until` for `timeseries` groups; keeps only the greatest version
for `latest` groups whatever the arrival order (`keys.replaces`); reads many
(group, id) pairs in one call; and hides items past their group's
`retention`. Every backend raises `UnknownGroupError` for a group the
catalog lacks and `NotStartedError` when used before `start()` or after
`aclose()`. Backends: `embedded` (one machine), `dynamodb`, `redis` (the
layout the cache tier uses, which also passes the store contract).

The pure functions here (`group_of`, `cutoff`, `clamp`, `window`,
`oldest_kept`) are the one place the group lookup, the retention cutoff and
the read window are decided; every backend and the cache use them.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from featureplane.codec import Item, Record
from featureplane.errors import UnknownGroupError
from featureplane.keys import version_bounds
from featureplane.spec import Catalog, FeatureGroup

__all__ = [
    "Clock",
    "Query",
    "Store",
    "Window",
    "clamp",
    "cutoff",
    "group_of",
    "oldest_kept",
    "wall_clock_ms",
    "window",
]

Clock = Callable[[], int]
"""Returns now in epoch milliseconds; injected so retention is testable."""


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Query:
    """Read one (group, id). `limit`, `since`, `until` (inclusive) apply to timeseries."""

    group: str
    id: str
    limit: int = 1
    since: int | None = None
    until: int | None = None


@dataclass(frozen=True, slots=True)
class Window:
    """What a timeseries read selects: at most `limit` versions in [`low`, `high`]."""

    limit: int
    low: str
    high: str


def group_of(catalog: Catalog, name: str) -> FeatureGroup:
    """The group called `name`; `UnknownGroupError` when the catalog lacks it."""
    group = catalog.groups.get(name)
    if group is None:
        raise UnknownGroupError(name)
    return group


def cutoff(group: FeatureGroup, now: int) -> int | None:
    """Oldest ts still within `group.retention` at `now`, or None when kept forever."""
    if group.kind != "timeseries" or group.retention is None:
        return None
    return now - group.retention


def oldest_kept(group: FeatureGroup, now: int) -> str:
    """The version bound below which items are past retention ("" when kept forever)."""
    cut = cutoff(group, now)
    return "" if cut is None else version_bounds(cut, None)[0]


def clamp(group: FeatureGroup, query: Query, now: int) -> tuple[int, int | None, int | None]:
    """(limit, since, until) to read for `query`: limit capped at `max_items`, `since`
    raised to the retention cutoff; (1, None, None) for a latest group."""
    if group.kind == "latest":
        return 1, None, None
    since = query.since
    cut = cutoff(group, now)
    if cut is not None:
        since = cut if since is None else max(since, cut)
    return min(query.limit, group.max_items), since, query.until


def window(group: FeatureGroup, query: Query, now: int) -> Window | None:
    """The version window of a timeseries `query`, or None when it selects nothing."""
    limit, since, until = clamp(group, query, now)
    low, high = version_bounds(since, until)
    if limit < 1 or low > high:
        return None
    return Window(limit, low, high)


class Store(ABC):
    """A durable or cache store of feature items, keyed as `keys` describes."""

    name: str = "store"

    def __init__(self, catalog: Catalog, clock: Clock = wall_clock_ms) -> None:
        self.catalog = catalog
        self.clock = clock

    @abstractmethod
    async def write(self, items: Sequence[Item]) -> None:
        """Write items durably; idempotent; `latest` items only as `keys.replaces` says."""

    @abstractmethod
    async def read(self, queries: Sequence[Query]) -> list[list[Record]]:
        """One newest-first list per query, in query order ([] when missing)."""

    async def start(self) -> None:
        """Open connections, files and tables; called once before use."""

    async def __aenter__(self) -> Store:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def ping(self) -> None:
        """Raise `StoreError` when the backend does not answer."""

    async def aclose(self) -> None:
        """Release connections and files."""

    def group(self, name: str) -> FeatureGroup:
        """The catalog's group `name`; `UnknownGroupError` when there is none."""
        return group_of(self.catalog, name)

    def cutoff(self, group: FeatureGroup) -> int | None:
        """Oldest ts still within `group.retention`, or None when kept forever."""
        return cutoff(group, self.clock())

    def clamp(self, group: FeatureGroup, query: Query) -> tuple[int, int | None, int | None]:
        """(limit, since, until) a backend should use for `query`, retention applied."""
        return clamp(group, query, self.clock())

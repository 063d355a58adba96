"""The async interface every store backend honours.

A backend writes many items at once; reads newest-first with `limit`,
`since`, `until` for `timeseries` groups; keeps only the greatest version
for `latest` groups whatever the arrival order; reads many (group, id)
pairs in one call; and hides items past their group's `retention`.
Backends: `embedded` (one machine), `dynamodb`, `redis` (the cache tier, which
also passes the contract suite).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from featureplane.codec import Item, Record
from featureplane.spec import Catalog, FeatureGroup

__all__ = ["Clock", "Query", "Store", "wall_clock_ms"]

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


class Store(ABC):
    """A durable or cache store of feature items, keyed as `keys` describes."""

    name: str = "store"

    def __init__(self, catalog: Catalog, clock: Clock = wall_clock_ms) -> None:
        self.catalog = catalog
        self.clock = clock

    @abstractmethod
    async def write(self, items: Sequence[Item]) -> None:
        """Write items durably; idempotent; `latest` items only if newer."""

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

    def cutoff(self, group: FeatureGroup) -> int | None:
        """Oldest ts still within `group.retention`, or None when kept forever."""
        if group.kind != "timeseries" or group.retention is None:
            return None
        return self.clock() - group.retention

    def clamp(self, group: FeatureGroup, query: Query) -> tuple[int, int | None, int | None]:
        """(limit, since, until) a backend should use for `query`, retention applied."""
        if group.kind == "latest":
            return 1, None, None
        since = query.since
        cutoff = self.cutoff(group)
        if cutoff is not None:
            since = cutoff if since is None else max(since, cutoff)
        return min(query.limit, group.max_items), since, query.until

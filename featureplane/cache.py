"""The cache tier's interface: what serving and the writers ask of Redis.

A cache holds, per (group, id), either the newest `max_items` of the store
(a timeseries, complete when shorter) or the newest value (a latest group),
each with a time to live, plus negative markers for ids the store lacks.
`RedisCache` (featureplane/stores/redis_cache.py) is the implementation;
the cache contract suite (tests/contract/test_cache_contract.py) pins the
behaviour any other must keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from featureplane.codec import Item, Record

__all__ = ["CacheFill", "CacheTier", "Cached"]


@dataclass(frozen=True, slots=True)
class CacheFill:
    """What a lower tier answered for one (group, id), to be written to the cache.

    `records` are the store's newest `max_items` (newest first) for a timeseries, or its
    one value for a latest group; empty means "the store has nothing": a negative marker
    with TTL `negative_ttl_ms` is written instead.
    """

    group: str
    id: str
    records: Sequence[Record]
    negative_ttl_ms: int = 5_000


@dataclass(frozen=True, slots=True)
class Cached:
    """One (group, id) as the cache holds it.

    `records`: every member newest first ([] when the key is missing); `pttl`: the key's
    remaining life in ms (None when missing); `negative_pttl`: the negative marker's
    remaining life in ms (None when there is no marker).
    """

    records: list[Record]
    pttl: int | None
    negative_pttl: int | None


class CacheTier(Protocol):
    """The cache tier as serving and the writers use it."""

    async def start(self) -> None:
        """Connect; called once before use (any other call before it, or after `aclose`,
        raises `NotStartedError`)."""

    async def aclose(self) -> None:
        """Release connections."""

    async def ping(self) -> None:
        """Raise `StoreError` when the cache does not answer."""

    async def write_through(self, items: Sequence[Item]) -> None:
        """Apply freshly written items: `write: through` groups newest-wins (latest, as
        `keys.replaces` says) or appended to keys already cached (timeseries); clear every
        written id's negative marker."""

    async def fill(self, fills: Sequence[CacheFill]) -> None:
        """Cache what a lower tier answered (or a negative marker for an empty answer)."""

    async def read_cached(self, keys: Sequence[tuple[str, str]]) -> list[Cached]:
        """One `Cached` per (group, id), in order. Every method raises `UnknownGroupError`
        for a group the catalog lacks."""

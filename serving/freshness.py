"""Pure cache logic: entries, TTL math, XFetch, and what a cached entry may answer.

Nothing here does I/O or reads a clock: callers pass `now` (epoch ms) and random
draws, so tests are exact.

A cached entry of a timeseries group holds the store's newest `max_items`
items of one id (or all of them, when there are fewer: it is then *complete*).
`answer` returns what the store itself would answer for a query, or None when
the entry cannot know it exactly:

- enough items in the query's range (the newest `limit` in range are cached,
  since anything uncached is older than everything cached), or
- the entry holds everything, or
- its oldest item is older than `since` (so nothing uncached is in range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from featureplane.codec import Record
from featureplane.spec import TTL, FeatureGroup
from featureplane.ttl import jittered

__all__ = [
    "Entry",
    "Freshness",
    "Rendered",
    "answer",
    "entry_from_cache",
    "entry_from_store",
    "freshness",
    "negative_entry",
    "rebased",
    "xfetch",
]

_OVERHEAD = 160  # bytes per entry and per record beyond their payloads, roughly

Rendered = tuple[int, bytes]
"""An answer rendered from an entry: how many records it holds, and its JSON."""


class Freshness(Enum):
    FRESH = "fresh"
    EARLY = "early"  # fresh, but XFetch chose to refresh it now
    STALE = "stale"  # past soft: serve and refresh in the background
    EXPIRED = "expired"  # past hard: never serve


@dataclass(frozen=True, slots=True)
class Entry:
    """What a cache tier holds for one (group, id).

    `records` newest first; `complete`: they are every item the store has; `negative`:
    the store had nothing. `stored_at` is when the store was read (ms, at the latest);
    `soft_at` and `hard_at` are absolute deadlines with jitter applied.

    `rendered`: answers already rendered from this entry, by the request's shape (its
    features, limit, since, until), added only by the local tier that holds the entry
    (`LocalCache.keep_rendered`, which counts their bytes): they live and die with it. Not
    an init field, so `dataclasses.replace` starts a new entry with none.
    """

    records: tuple[Record, ...]
    complete: bool
    stored_at: int
    soft_at: int
    hard_at: int
    negative: bool = False
    rendered: dict[object, Rendered] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    @property
    def size(self) -> int:
        held = sum(len(r.value) + _OVERHEAD for r in self.records)
        return _OVERHEAD + held + sum(len(j) + _OVERHEAD for _, j in self.rendered.values())


def _deadlines(ttl: TTL, stored_at: int, r_soft: float, r_hard: float) -> tuple[int, int]:
    hard = stored_at + jittered(ttl.hard, ttl.jitter, r_hard)
    soft = min(stored_at + jittered(ttl.soft, ttl.jitter, r_soft), hard)
    return soft, hard


def entry_from_store(
    group: FeatureGroup, records: list[Record], now: int, r_soft: float, r_hard: float
) -> Entry:
    """An entry from a store read of the newest `max_items` (newest first)."""
    soft, hard = _deadlines(group.ttl, now, r_soft, r_hard)
    complete = group.kind == "latest" or len(records) < group.max_items
    return Entry(tuple(records), complete, now, soft, hard)


def negative_entry(now: int, ttl_ms: int) -> Entry:
    """The store has nothing: remembered for `ttl_ms`, never refreshed early."""
    return Entry((), True, now, now + ttl_ms, now + ttl_ms, negative=True)


def entry_from_cache(
    group: FeatureGroup, records: list[Record], pttl: int, now: int, r_soft: float
) -> Entry:
    """An entry from a Redis key that has `pttl` ms to live.

    Redis enforces the hard TTL; the age is at least `hard - pttl` (the key's TTL was at
    most `hard`), so taking that as the age makes the soft deadline come early, never late.
    """
    hard_at = now + pttl
    stored_at = min(now, now + pttl - group.ttl.hard)
    soft_at = min(stored_at + jittered(group.ttl.soft, group.ttl.jitter, r_soft), hard_at)
    complete = group.kind == "latest" or len(records) < group.max_items
    return Entry(tuple(records), complete, stored_at, soft_at, hard_at)


def rebased(entry: Entry, group: FeatureGroup, r_soft: float, r_hard: float) -> Entry:
    """`entry` as an upper tier keeps it: its own jittered TTLs, counted from `stored_at`."""
    if entry.negative:
        return entry
    soft, hard = _deadlines(group.ttl, entry.stored_at, r_soft, r_hard)
    return Entry(
        entry.records,
        entry.complete,
        entry.stored_at,
        min(soft, entry.hard_at),
        min(hard, entry.hard_at),
    )


def xfetch(now: int, expiry: int, delta_ms: float, beta: float, r: float) -> bool:
    """Vattani et al.'s early expiration: refresh when now - delta*beta*ln(r) >= expiry.

    `r` is uniform in (0, 1]; `delta_ms` is how long a refresh takes.
    """
    return now - delta_ms * beta * math.log(r) >= expiry


def freshness(entry: Entry, now: int, delta_ms: float, beta: float, r: float) -> Freshness:
    if now >= entry.hard_at:
        return Freshness.EXPIRED
    if now >= entry.soft_at:
        return Freshness.STALE
    if not entry.negative and xfetch(now, entry.soft_at, delta_ms, beta, r):
        return Freshness.EARLY
    return Freshness.FRESH


def answer(
    entry: Entry, kind: str, limit: int, since: int | None, until: int | None
) -> list[Record] | None:
    """The records the store would answer for this query, or None if `entry` cannot tell.

    `limit`, `since`, `until` are already clamped (retention applied to `since`).
    """
    if kind == "latest" or entry.negative:
        return list(entry.records)
    if limit < 1 or (since is not None and until is not None and since > until):
        return []
    records = entry.records
    if since is None and until is None:
        hit = list(records[:limit])
    else:
        hit = []
        for r in records:
            if (until is None or r.ts <= until) and (since is None or r.ts >= since):
                hit.append(r)
                if len(hit) == limit:
                    break
    if len(hit) >= limit or entry.complete:
        return hit
    if since is not None and records and records[-1].ts < since:
        return hit
    return None

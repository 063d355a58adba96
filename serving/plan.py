"""The read plan of one request: one `Wanted` per (group, id), answered tier by tier.

The reader turns each `Query` into a `Wanted` that carries its group's spec, its cache
key and the query as every store applies it (`stores.base.clamp`: the limit capped at
`max_items`, retention folded into `since`). Each tier takes the wanted pairs still
unanswered, sets `records` on those it can answer exactly, and passes the rest on, in
request order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from featureplane.codec import Record
from featureplane.serving.freshness import Entry
from featureplane.spec import Catalog, FeatureGroup
from featureplane.stores.base import Query, clamp, group_of

__all__ = ["Key", "Wanted", "plan"]

Key = tuple[str, str]
"""(group, id): how every tier names what it holds."""


@dataclass(slots=True)
class Wanted:
    """One (group, id) of a request; `records` is None until a tier answers it.

    Not frozen: the tier that answers sets `records`, so a request needs no parallel
    lists of results and pending positions. `entry`: the local tier's entry that answered
    it, if that tier did (answers rendered from it are kept with it).
    """

    group: FeatureGroup
    key: Key
    limit: int
    since: int | None
    until: int | None
    records: list[Record] | None = None
    entry: Entry | None = None

    @property
    def ranged(self) -> bool:
        """Does the query bound ts? Then only an entry that covers the range answers it."""
        return self.since is not None or self.until is not None

    def query(self) -> Query:
        """The clamped query, as sent to the store."""
        return Query(self.key[0], self.key[1], self.limit, self.since, self.until)


def plan(catalog: Catalog, queries: Sequence[Query], now: int) -> list[Wanted]:
    """One `Wanted` per query, in order, retention judged at `now`; a group the catalog
    lacks raises `UnknownGroupError` before any tier is read."""
    out: list[Wanted] = []
    for q in queries:
        group = group_of(catalog, q.group)
        out.append(Wanted(group, (q.group, q.id), *clamp(group, q, now)))
    return out

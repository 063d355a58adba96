"""The Redis store: feature items in Redis, honouring the store contract.

The layout is `stores.redis_layout`'s. On top of it, as a store:

    timeseries  the set is capped at the group's `max_items` (the newest
                kept); with a `retention`, members older than the cutoff are
                removed on write and the key expires when its newest member
                does.
    latest      a write lands only when `keys.replaces` says so (the Lua
                script compares versions as numbers, since Lua's `<` follows
                the server's locale), so the newest event wins in any
                arrival order.

Writes run two Lua scripts, one call per key per batch, in one
non-transactional pipeline. Every command names one key, so under Redis
Cluster (`cluster=True`) redis-py routes each to its slot's primary and sends
the pipeline to every node at once. A replayed event removes its own version first and so
overwrites itself. Reads are one pipelined round trip of GET and
ZREVRANGEBYLEX over `base.window`, so expired items are hidden before Redis
removes them.

Expiry follows the injected clock: a key's TTL is `newest ts + retention -
clock()`, set with PEXPIRE, which equals PEXPIREAT under the wall clock and
stays right under a test clock or skew between this host and Redis.

The cache tier over the same layout is `stores.redis_cache.RedisCache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from featureplane.codec import Item, Record
from featureplane.keys import newest
from featureplane.spec import Catalog
from featureplane.stores import _redis_lua as lua
from featureplane.stores._redis_conn import Client, RedisConnection, first_error, translated
from featureplane.stores.base import Clock, Query, Store, oldest_kept, wall_clock_ms, window
from featureplane.stores.redis_layout import (
    Call,
    check_prefix,
    key_of,
    member_of,
    records_of,
    timeseries_members,
)

__all__ = ["RedisStore"]


class RedisStore(Store):
    """Feature items in Redis, laid out as `stores.redis_layout` says."""

    name = "redis"

    def __init__(
        self,
        catalog: Catalog,
        url: str,
        *,
        clock: Clock = wall_clock_ms,
        prefix: str = "fp:",
        client: Client | None = None,
        cluster: bool = False,
    ) -> None:
        """`client`: use this one (left open by `aclose`) instead of connecting to `url`;
        `cluster`: `url` is a node of a Redis Cluster."""
        super().__init__(catalog, clock)
        self.url = url
        self.prefix = check_prefix(prefix)
        self.connection = RedisConnection(url, client, owner="RedisStore", cluster=cluster)

    async def start(self) -> None:
        await self.connection.start()

    async def aclose(self) -> None:
        """Close the client if this store created it; a client passed in stays open."""
        await self.connection.aclose()

    async def ping(self) -> None:
        await self.connection.ping()

    async def write(self, items: Sequence[Item]) -> None:
        await self.connection.run(self._plan(items), "write")

    def _plan(self, items: Sequence[Item]) -> list[Call]:
        """One script call per key of the batch, in first-seen order."""
        by_key: dict[tuple[str, str], list[Item]] = {}
        for item in items:
            by_key.setdefault((item.group, item.id), []).append(item)
        calls: list[Call] = []
        now = self.clock()
        for (group_name, entity_id), batch in by_key.items():
            group = self.group(group_name)
            key = key_of(self.prefix, group_name, entity_id)
            if group.kind == "latest":
                calls.append((lua.LATEST_SHA, [key], [member_of(newest(batch))]))
                continue
            members = timeseries_members(batch, group.max_items, self.cutoff(group))
            if not members:
                continue
            retention = "" if group.retention is None else group.retention
            args: list[bytes | int | str] = [
                group.max_items,
                oldest_kept(group, now),
                now,
                retention,
            ]
            calls.append((lua.TIMESERIES_SHA, [key], [*args, *members]))
        return calls

    async def read(self, queries: Sequence[Query]) -> list[list[Record]]:
        if not queries:
            return []
        pipe = self.connection.client.pipeline(transaction=False)
        now = self.clock()
        sent: list[bool] = []
        for q in queries:
            group = self.group(q.group)
            key = key_of(self.prefix, q.group, q.id)
            if group.kind == "latest":
                pipe.get(key)
                sent.append(True)
                continue
            win = window(group, q, now)
            if win is None:
                sent.append(False)
                continue
            high, low = b"[" + win.high.encode("ascii"), b"[" + win.low.encode("ascii")
            pipe.zrevrangebylex(key, high, low, start=0, num=win.limit)
            sent.append(True)
        results: list[Any] = []
        if any(sent):
            with translated("read"):
                results = await pipe.execute(raise_on_error=False)
            first_error(results, "read")
        replies = iter(results)
        return [records_of(next(replies)) if was_sent else [] for was_sent in sent]

"""Invalidation of serving's local tier: what writers publish, what serving reads back.

A serving process keeps (group, id) values in its in-process tier (serving/local.py)
until their soft TTL. When a writer (ingest, retry, backfill, load: every job writes
through `operators.write.Writer`) has put a batch's items in the store and Redis, it
publishes the batch's keys on one Redis pub/sub channel, and every serving process
subscribed to it drops those keys (serving/invalidate.py), so the next read finds the
new value. One message carries many keys: a batch costs one PUBLISH, or a few when its
keys exceed `MAX_MESSAGE_BYTES`.

Why pub/sub written by the writer, not Redis client-side caching (RESP3 tracking):

- the local tier is filled from the store too, not only from Redis reads, and tracking
  only knows the keys a connection read from Redis; a group with tiers
  `[local, store]` is never written to Redis at all, yet its local copies go old too;
- tracking needs every pooled connection set up with REDIRECT to one that listens, and
  under Redis Cluster one such connection per node; BCAST mode instead sends every pod
  every key write, of every group;
- tracking also fires on serving's own fills into Redis, so every pod would drop what
  another pod just read;
- a writer knows its batch: one message names hundreds of keys, where tracking sends
  one invalidation per key.

Under Redis Cluster, PUBLISH is forwarded to every node, so a subscriber connected to
any one node hears every message (the PUBLISH page of the Redis documentation says so;
tests/integration/test_invalidation.py runs it on a real cluster).

Pub/sub is at most once: a message sent while a subscriber is disconnected is lost. So a
subscriber clears its whole local tier on every (re)subscribe, and while unsubscribed
the groups' TTLs bound staleness as they always did. A failed PUBLISH is counted
(`featureplane_invalidations_published{outcome="failed"}`) and logged at most once a
minute, never failing the write: it is a hint, and the TTLs still bound staleness. A
deployment without Redis (the embedded single machine without FEATUREPLANE_REDIS_URL)
has no channel and stays TTL-bound.

Message: UTF-8 JSON `{"<group>": ["<id>", ...], ...}` (orjson), only groups whose tiers
include `local`, at most `MAX_MESSAGE_BYTES`. The channel is the Redis key prefix
followed by `invalidate` (`fp:invalidate` by default).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Mapping

import orjson

from featureplane.codec import Item
from featureplane.errors import ValidationError
from featureplane.spec import Catalog
from featureplane.stores._redis_conn import RedisConnection, translated
from featureplane.stores.redis_cache import RedisCache

__all__ = [
    "MAX_MESSAGE_BYTES",
    "InvalidMessageError",
    "Publisher",
    "channel_of",
    "decode",
    "encode",
    "local_groups",
    "publisher_of",
]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024
"""The largest message a writer sends and a subscriber accepts (a 10,000-item batch of
short ids is two or three messages)."""

Key = tuple[str, str]


class InvalidMessageError(ValidationError):
    """A message on the channel that is not an invalidation (too large, not the format):
    malformed input, under featureplane's root error."""


def channel_of(prefix: str) -> bytes:
    """The channel under a Redis key prefix (`fp:` -> `fp:invalidate`)."""
    return prefix.encode() + b"invalidate"


def local_groups(catalog: Catalog) -> frozenset[str]:
    """The groups a serving process may hold in its local tier: stored, never on demand."""
    return frozenset(
        name for name, g in catalog.groups.items() if "local" in g.tiers and not g.on_demand
    )


def encode(keys: Mapping[str, Iterable[str]]) -> list[bytes]:
    """Messages naming every id of `keys` (group -> ids), each at most `MAX_MESSAGE_BYTES`."""
    doc = {g: list(ids) for g, ids in keys.items()}
    doc = {g: ids for g, ids in doc.items() if ids}
    if not doc:
        return []
    data = orjson.dumps(doc)
    if len(data) <= MAX_MESSAGE_BYTES:  # a batch's keys, mostly: one dumps, no split
        return [data]
    return _split([(g, i) for g, ids in doc.items() for i in ids], len(data))


def _split(flat: list[Key], size: int) -> list[bytes]:
    """`flat` in messages under the bound, cut in as many parts as `size` bytes need."""
    if len(flat) == 1:  # cannot happen with ids of at most 1 KiB; never sent if it did
        log.warning("an invalidation of one key is %d bytes: not sent", size)
        return []
    parts = max(2, math.ceil(size / (MAX_MESSAGE_BYTES * 0.9)))  # most fit at once
    step = math.ceil(len(flat) / parts)
    out: list[bytes] = []
    for n in range(0, len(flat), step):
        part: dict[str, list[str]] = {}
        for g, i in flat[n : n + step]:
            part.setdefault(g, []).append(i)
        data = orjson.dumps(part)
        out += [data] if len(data) <= MAX_MESSAGE_BYTES else _split(flat[n : n + step], len(data))
    return out


def decode(data: object, groups: frozenset[str]) -> list[Key]:
    """The keys a message names, of `groups` only (others are no business of this process);
    `InvalidMessageError` for anything that is not a message of `encode`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidMessageError(f"not bytes: {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise InvalidMessageError(f"{len(data)} bytes, over {MAX_MESSAGE_BYTES}")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessageError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidMessageError("not a JSON object")
    out: list[Key] = []
    for group, ids in doc.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise InvalidMessageError("a group's ids are not a list of strings")
        if group in groups:
            out.extend((group, i) for i in ids)
    return out


class Publisher:
    """Publishes the keys of written items on the channel of one Redis connection."""

    def __init__(
        self,
        catalog: Catalog,
        connection: RedisConnection,
        prefix: str,
        *,
        log_every_s: float = 60.0,
    ) -> None:
        self.connection = connection
        self.channel = channel_of(prefix)
        self.groups = local_groups(catalog)
        self.failures = 0
        self._log_every_s = log_every_s
        self._logged_at = -math.inf
        self._unlogged = 0

    def keys(self, items: Iterable[Item]) -> dict[str, dict[str, None]]:
        """group -> ids (an ordered set) of the `items` a serving process may hold."""
        groups = self.groups
        out: dict[str, dict[str, None]] = {}
        for it in items:  # ~0.2 us an item; a set of tuples, then grouping, cost twice that
            group = it.group
            if group in groups:
                ids = out.get(group)
                if ids is None:
                    ids = out[group] = {}
                ids[it.id] = None
        return out

    async def publish(self, items: Iterable[Item]) -> int:
        """Publish the keys of `items`; the number of messages sent. Raises the Redis
        error (`StoreError`/`TransientStoreError`) when it failed: see `failed`."""
        messages = encode(self.keys(items))
        if not messages:
            return 0
        client, channel = self.connection.client, self.channel
        with translated("invalidation publish"):
            # Not a pipeline: redis-py's cluster pipeline refuses PUBLISH. Concurrent
            # calls use several connections; order between them does not matter.
            await asyncio.gather(*(client.publish(channel, m) for m in messages))
        return len(messages)

    def failed(self, exc: BaseException) -> None:
        """Log a failed publish, at most once every `log_every_s` (a Redis outage would
        otherwise log one line a batch)."""
        self.failures += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < self._log_every_s:
            return
        self._logged_at = now
        log.warning(
            "invalidations not published (%d failure(s) since the last line): %s; serving's "
            "local tiers keep old values until their soft TTL",
            self._unlogged,
            exc,
        )
        self._unlogged = 0


def publisher_of(catalog: Catalog, cache: object) -> Publisher | None:
    """The publisher on a writer's cache tier when it is Redis and some group has a local
    tier; None otherwise (no Redis, no channel: serving stays TTL-bound)."""
    if not isinstance(cache, RedisCache) or not local_groups(catalog):
        return None
    return Publisher(catalog, cache.connection, cache.prefix)

"""Serving's side of invalidation: a task that drops written keys from the local tier.

Writers publish the keys of every batch they wrote on a Redis channel (the mechanism,
and why pub/sub rather than client-side tracking: featureplane/invalidation.py). Here
one task per serving process listens on that channel with a connection of its own and
calls `LocalCache.invalidate` with each message's keys, so the next read of a written
(group, id) goes to Redis or the store and answers the new value; a read already under
way cannot put the old value back (LocalCache's token).

Pub/sub delivers at most once, so what a disconnected subscriber missed is unknown:

- every (re)subscribe clears the whole local tier, after the subscription is confirmed
  (a write published between the clear and the subscription would be lost otherwise);
- the connection is PINGed when idle, so a silent network loses the subscription
  after `2 * ping_s` at the latest, not never; it is reopened with capped backoff
  (featureplane/backoff.py), rotating over the cluster's primaries under Redis Cluster;
- while unsubscribed, the groups' TTLs bound staleness as without invalidation.

Refresh or drop (`ServeConfig.invalidation`, `refresh` by default): `drop` only drops,
so the next read of a written key misses the local tier and reads Redis (or the store).
`refresh` also re-reads from Redis, in the background and in one call a batch, the keys
of a message that this process held (groups with a Redis tier; the others are dropped),
so a key read more often than it is written keeps hitting the local tier. Its cost:
every process reads every written key it holds, read again or not; with many processes
behind a load balancer that is most of the write rate times the processes, where `drop`
reads only the keys read again. bench/invalidation.py measured both (1,000 writes/s over
10,000 ids, each read about every 5 s): `drop` lost a quarter of the local hits,
`refresh` half a point, and served more requests a second (its reads are batched, off
the request path).

A long local soft TTL (`ServeConfig.local_soft_ttl`): while subscribed, a value put in
the local tier stays fresh that long (never past its hard TTL), instead of its group's
soft TTL; the background refreshes that soft expiry costs are mostly wasted once writes
invalidate. Since the promise rests on hearing every write, losing the subscription
clears the local tier at once when it is set.

A message that is not an invalidation (garbage, too large, another format) is counted
(`featureplane_invalidation_messages{outcome="garbled"}`), logged at most once a minute
and ignored; it never stops the task. Without a Redis tier there is no channel: the
local tier stays TTL-bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from featureplane.backoff import backoff_ms
from featureplane.cache import CacheTier
from featureplane.errors import NotStartedError
from featureplane.invalidation import InvalidMessageError, channel_of, decode, local_groups
from featureplane.serving.config import ServeConfig
from featureplane.serving.freshness import Entry, entry_from_cache, rebased
from featureplane.serving.local import LocalCache
from featureplane.serving.logs import RateLimitedLog
from featureplane.serving.metrics import Metrics
from featureplane.serving.plan import Key
from featureplane.spec import Catalog
from featureplane.stores.base import Clock, wall_clock_ms
from featureplane.stores.redis_cache import RedisCache

__all__ = [
    "SUBSCRIBER",
    "InvalidatedCache",
    "Refresher",
    "Subscriber",
    "local_tier",
    "subscriber_of",
]

log = logging.getLogger(__name__)


class InvalidatedCache(LocalCache):
    """The local tier of a process that hears invalidations: while `subscribed`, a value
    put stays fresh for `soft_ms` after it was stored (within its hard TTL)."""

    def __init__(self, max_bytes: int, soft_ms: int) -> None:
        super().__init__(max_bytes)
        self.soft_ms = soft_ms
        self.subscribed = False

    def put(self, key: Key, entry: Entry, token: int | None = None) -> None:
        if self.subscribed and not entry.negative:
            soft = min(entry.hard_at, entry.stored_at + self.soft_ms)
            if soft > entry.soft_at:
                entry = replace(entry, soft_at=soft)
        super().put(key, entry, token)


def local_tier(config: ServeConfig, redis: CacheTier | None) -> LocalCache | None:
    """The local tier `config` asks for: none, the plain one, or one with a long soft TTL
    while subscribed (only with a Redis tier to subscribe on)."""
    if not config.local_cache_mb:
        return None
    size = config.local_cache_mb * 1024 * 1024
    if config.invalidation != "off" and config.local_soft_ttl and isinstance(redis, RedisCache):
        return InvalidatedCache(size, config.local_soft_ttl)
    return LocalCache(size)


class Refresher:
    """Re-reads from Redis, in the background, keys dropped from `local` that it held."""

    BATCH = 1_000
    """Keys a Redis call reads at most."""

    def __init__(
        self,
        catalog: Catalog,
        local: LocalCache,
        redis: CacheTier,
        metrics: Metrics,
        *,
        timeout_ms: int = 100,
        clock: Clock = wall_clock_ms,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.catalog, self.local, self.redis, self.metrics = catalog, local, redis, metrics
        self.timeout_s = timeout_ms / 1000
        self.clock, self.rand = clock, rand
        self.groups = frozenset(
            n for n in local_groups(catalog) if "redis" in catalog.group(n).tiers
        )
        self._pending: dict[Key, None] = {}  # insertion-ordered, deduplicated
        self._wake = asyncio.Event()

    def held(self, keys: Sequence[Key]) -> list[Key]:
        """The `keys` to refresh: held in the local tier now, of a group Redis has."""
        local, groups = self.local, self.groups
        return [k for k in keys if k[0] in groups and local.get(k) is not None]

    def add(self, keys: Sequence[Key]) -> None:
        if keys:
            self._pending.update(dict.fromkeys(keys))
            self._wake.set()

    async def run(self) -> None:
        """Until cancelled: read what is pending, a batch at a time (what arrives meanwhile
        waits for the next call: one call in flight at most)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = list(itertools.islice(self._pending, self.BATCH))
                for key in batch:
                    del self._pending[key]
                await self.refresh(batch)

    async def refresh(self, keys: list[Key]) -> None:
        """Put Redis's values of `keys` in the local tier, unless invalidated meanwhile.
        A failure leaves them dropped: the next read reads them."""
        token = self.local.token()  # after their invalidation, before the read
        try:
            async with asyncio.timeout(self.timeout_s):
                cached = await self.redis.read_cached(keys)
        except Exception:
            self.metrics.errors.labels("redis", "invalidation refresh").inc()
            return
        now = self.clock()
        for key, c in zip(keys, cached, strict=True):
            if c.records and c.pttl is not None:  # what tiers.py's Redis path puts, the same way
                group = self.catalog.group(key[0])
                entry = entry_from_cache(group, list(c.records), c.pttl, now, self.rand())
                if now < entry.hard_at:
                    self.local.put(key, rebased(entry, group, self.rand(), self.rand()), token)


class Subscriber:
    """Listens on the invalidation channel and drops the named keys from `local` (and
    has a `Refresher` read again those it held)."""

    def __init__(
        self,
        catalog: Catalog,
        local: LocalCache,
        urls: Callable[[], list[str]],
        prefix: str,
        metrics: Metrics,
        *,
        ping_s: float = 5.0,
        backoff_cap_ms: float = 5_000.0,
        refresher: Refresher | None = None,
    ) -> None:
        """`urls()`: the Redis servers to subscribe on, tried in turn after failures."""
        self.local, self.urls, self.metrics = local, urls, metrics
        self.refresher = refresher
        self.channel = channel_of(prefix)
        self.groups = local_groups(catalog)
        self.ping_s, self.backoff_cap_ms = ping_s, backoff_cap_ms
        self.subscribed = False
        self.events = RateLimitedLog(log)
        self._task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        metrics.invalidation_subscribed.set_function(lambda: 1.0 if self.subscribed else 0.0)

    async def start(self) -> None:
        """Start listening in the background: Redis down at start-up only delays it."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="invalidation subscriber")
        if self.refresher is not None and self._refreshing is None:
            self._refreshing = asyncio.create_task(
                self.refresher.run(), name="invalidation refresh"
            )

    async def aclose(self) -> None:
        for task in (self._task, self._refreshing):
            # redis-py may swallow a cancel that lands as its read times out (it takes the
            # CancelledError for its own timeout): cancel again until the task is done.
            while task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            if task is not None and not task.cancelled():
                task.exception()  # retrieved: a failure was logged where it happened
        self._task = self._refreshing = None
        self._set_subscribed(False)

    async def _run(self) -> None:
        attempt = 0
        while True:
            urls = self.urls()
            url = urls[attempt % len(urls)]
            started = time.monotonic()
            try:
                await self._listen(url)
            except Exception as exc:  # any failure: the subscription is gone, start again
                self.events.event(
                    "lost", f"invalidation channel on {_where(url)} lost or refused: {exc}"
                )
            self._lost()
            if time.monotonic() - started > self.ping_s * 4:
                attempt = 0  # it had been working: a blip, not a Redis that stays down
            await asyncio.sleep(backoff_ms(attempt, 100.0, self.backoff_cap_ms) / 1000)
            attempt += 1

    async def _listen(self, url: str) -> None:
        """Subscribe on `url` and handle messages until the connection fails."""
        # No retries inside redis-py: its pub/sub would reconnect and resubscribe silently,
        # and what was published in between would be missed without a clear.
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=5.0,
            socket_timeout=5.0,
            retry=Retry(NoBackoff(), 0),
            client_name="featureplane-invalidation",  # to be found in CLIENT LIST
        )
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            reply = await pubsub.get_message(timeout=self.ping_s)
            if reply is None or reply["type"] != "subscribe":
                raise ConnectionError(f"no subscribe confirmation: {reply!r}")
            self.local.clear()  # whatever was published before now may have been missed
            self.metrics.invalidation_subscribes.inc()
            self._set_subscribed(True)
            heard = time.monotonic()
            me = asyncio.current_task()
            while True:
                msg = await pubsub.get_message(timeout=self.ping_s)
                if me is not None and me.cancelling():  # a cancel redis-py swallowed
                    raise asyncio.CancelledError
                now = time.monotonic()
                if msg is None:
                    if now - heard > 2 * self.ping_s:
                        raise ConnectionError(f"no answer to PING within {2 * self.ping_s:g} s")
                    await pubsub.ping()
                    continue
                heard = now
                if msg["type"] == "message":
                    self.handle(msg["data"])
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            finally:
                await client.aclose()

    def handle(self, data: object) -> None:
        """Drop the keys one message names; count and ignore anything else."""
        try:
            keys = decode(data, self.groups)
        except InvalidMessageError as exc:
            self.metrics.invalidation_messages.labels("garbled").inc()
            self.events.event("garbled", f"ignored a message on the invalidation channel: {exc}")
            return
        held = self.refresher.held(keys) if self.refresher is not None else []
        self.local.invalidate(keys)
        if self.refresher is not None:
            self.refresher.add(held)
        self.metrics.invalidation_messages.labels("ok").inc()
        self.metrics.invalidated_keys.inc(len(keys))

    def _lost(self) -> None:
        was = self.subscribed
        self._set_subscribed(False)
        if was and isinstance(self.local, InvalidatedCache):
            # Its values were kept fresh past their groups' soft TTL on the promise of
            # hearing every write; that promise is gone.
            self.local.clear()

    def _set_subscribed(self, on: bool) -> None:
        self.subscribed = on
        if isinstance(self.local, InvalidatedCache):
            self.local.subscribed = on


SUBSCRIBER = web.AppKey("invalidation_subscriber", Subscriber)
"""The app's subscriber, when it has one."""


def subscriber_of(
    catalog: Catalog,
    redis: CacheTier | None,
    local: LocalCache | None,
    metrics: Metrics,
    config: ServeConfig,
    clock: Clock = wall_clock_ms,
    rand: Callable[[], float] = random.random,
) -> Subscriber | None:
    """The subscriber for a local tier over a Redis tier; None without either, with
    `invalidation` off, or when no group has a local tier."""
    if local is None or config.invalidation == "off" or not isinstance(redis, RedisCache):
        return None
    if not local_groups(catalog):
        return None
    url = redis.url

    def urls() -> list[str]:
        """The configured node first, then (Redis Cluster) every primary the cache's client
        knows: any node hears every PUBLISH, so any reachable one will do."""
        found = [url]
        try:
            client = redis.connection.client if redis.connection.cluster else None
        except NotStartedError:  # the Redis tier failed to start or was closed
            client = None
        if isinstance(client, RedisCluster):
            found += [_at(url, node.host, int(node.port)) for node in client.get_primaries()]
        return found

    refresher = None
    if config.invalidation == "refresh":
        refresher = Refresher(
            catalog, local, redis, metrics, timeout_ms=config.redis_timeout, clock=clock, rand=rand
        )
    return Subscriber(catalog, local, urls, redis.prefix, metrics, refresher=refresher)


def _at(url: str, host: str, port: int) -> str:
    """`url` (its scheme, credentials and options) pointed at another host and port."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@{host}:{port}" if auth else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _where(url: str) -> str:
    """host:port of `url`, never its password."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"

"""The Redis backend: the cache tier, which also passes the store contract.

Layout (every key is `prefix + keys.partition_key(group, id)`, UTF-8):

    timeseries  a sorted set; every score is 0 and every member is
                `version (26 bytes) + value`, so lexicographic order is time
                order (`keys.version` is fixed-width). Newest first is
                ZREVRANGEBYLEX; `since`/`until` are the lex bounds of
                `keys.version_bounds`. The set is capped at the group's
                `max_items` (the newest kept); with a `retention`, members
                older than the cutoff are removed on write and the key
                expires when its newest member does.
    latest      a string `version (26 bytes) + value`; a write lands only if
                its version is >= the stored one, so the newest event wins
                in any arrival order (an equal version is the same event).

Writes run two Lua scripts, one call per key per batch, all in one
non-transactional pipeline (each script touches one key, so the layout also
suits Redis Cluster). A replayed event removes its own version first and so
overwrites itself. Reads are one pipelined round trip of GET and
ZREVRANGEBYLEX, with `Store.clamp` applied so that expired items are hidden
before Redis removes them.

Expiry follows the injected clock: a key's TTL is `newest ts + retention -
clock()`, set with PEXPIRE, which equals PEXPIREAT under the wall clock and
stays right under a test clock or skew between this host and Redis.

The cache tier (shared by serving and ingestion's write-through) uses the
same layout and prefix, with these rules:

    timeseries  a cached key holds exactly the newest min(max_items, total)
                items of the store, so it is *complete* (holds every item)
                when it has fewer than `max_items` members. `fill` merges the
                store's newest `max_items` records into the key; `write_through`
                appends only to keys that already exist, never creating a
                partial key. Both cap at `max_items` and trim past retention.
    latest      newest-wins, as `write`.
    expiry      every cache write sets PEXPIRE to the group's hard TTL, shortened
                by up to `ttl.jitter` at random; Redis itself enforces "never
                past hard". `read_cached` returns PTTL in the same pipeline, so
                serving knows a value's age (at least `hard - pttl`).
    negative    `prefix + "neg:" + group#id` marks "the store has nothing for
                this (group, id)"; it lives for the negative TTL and every
                `write_through` of that (group, id) deletes it.

Races between write-through and a background fill (which read the store
earlier) can leave a cached value that misses a newer item; merging in `fill`
narrows this to a fill that creates a key concurrently with a write-through
of a key that did not exist. Such staleness lasts at most the key's hard TTL
(the negative TTL for markers).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from featureplane.cache import Cached, CacheFill
from featureplane.codec import Item, Record
from featureplane.errors import StoreError, TransientStoreError, ValidationError
from featureplane.keys import partition_key, version_bounds
from featureplane.spec import Catalog, FeatureGroup
from featureplane.stores import _redis_lua as lua
from featureplane.stores.base import Clock, Query, Store, wall_clock_ms
from featureplane.ttl import Rand, jittered

__all__ = [
    "THROUGH_KEYS",
    "VERSION_LEN",
    "RedisStore",
    "c_packing",
    "key_of",
    "latest_winner",
    "lex_range",
    "member_of",
    "negative_key_of",
    "record_of",
    "through_call",
    "through_chunks",
    "timeseries_members",
]

VERSION_LEN = 26
"""Bytes of `keys.version`: 13 digits of ts, `#`, 12 hex digits."""

_TRANSIENT: tuple[type[BaseException], ...] = (
    rx.ConnectionError,  # includes BusyLoadingError (a replica still loading its data)
    rx.TimeoutError,
    rx.TryAgainError,
    rx.MasterDownError,
    rx.ReadOnlyError,  # writing to a replica mid-failover
    OSError,  # sockets and builtin TimeoutError, should one slip past redis-py
)
_PERMANENT: tuple[type[BaseException], ...] = (
    rx.AuthenticationError,  # subclasses of ConnectionError that retrying will not fix
    rx.AuthorizationError,
)

THROUGH_KEYS = 512
"""Most (group, id) pairs per write-through script call: one call costs redis-py about as
much CPU as one single-key call, and this bounds how long one call holds Redis."""

Call = tuple[str, list[bytes], list[bytes | int | str]]
"""One script call: sha, KEYS, ARGV."""


def _hiredis_packer() -> Callable[[tuple[Any, ...]], bytes] | None:
    try:
        import hiredis
    except ImportError:  # hiredis is optional: redis-py packs in Python then
        return None
    return getattr(hiredis, "pack_command", None)


_hiredis_pack = _hiredis_packer()

# ---------------------------------------------------------------- pure layout


def key_of(prefix: str, group: str, entity_id: str) -> bytes:
    """The Redis key of one (group, id)."""
    try:
        return (prefix + partition_key(group, entity_id)).encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"id {entity_id!r} is not valid unicode text") from None


def negative_key_of(prefix: str, group: str, entity_id: str) -> bytes:
    """The key of the negative marker of one (group, id).

    Group names never contain ':', so `prefix + "neg:"...` cannot collide with a value key.
    """
    return key_of(prefix + "neg:", group, entity_id)


def member_of(item: Item) -> bytes:
    """The stored bytes of one item: its version, then its value."""
    ver = item.version.encode("ascii")
    if len(ver) != VERSION_LEN:
        raise ValidationError(f"version {item.version!r} is not {VERSION_LEN} characters")
    return ver + item.value


def record_of(stored: bytes) -> Record:
    """Stored bytes (a set member or a latest value) -> Record."""
    ver = stored[:VERSION_LEN].decode("ascii")
    return Record(int(ver[:13]), ver, stored[VERSION_LEN:])


def lex_range(since: int | None, until: int | None) -> tuple[bytes, bytes]:
    """(max, min) inclusive ZREVRANGEBYLEX bounds for since <= ts <= until."""
    low, high = version_bounds(since, until)
    return b"[" + high.encode("ascii"), b"[" + low.encode("ascii")


def timeseries_members(items: Sequence[Item], max_items: int, cutoff: int | None) -> list[bytes]:
    """The members one batch adds to a key, oldest first.

    One per version (the last in the batch wins), none older than `cutoff`, and at most
    `max_items`: older ones could not survive the cap whatever the key already holds.
    """
    by_version = {i.version: i for i in items if cutoff is None or i.ts >= cutoff}
    newest = sorted(by_version)[-max_items:]
    return [member_of(by_version[v]) for v in newest]


def latest_winner(items: Sequence[Item]) -> Item:
    """The item of a batch that a `latest` key keeps: the greatest version, later on ties."""
    best = items[0]
    for item in items[1:]:
        if item.version >= best.version:
            best = item
    return best


def _stored(record: Record) -> bytes:
    return record.version.encode("ascii") + record.value


ThroughEntry = tuple[bytes | None, bytes | None, list[bytes | int | str]]
"""One (group, id) of a write-through: value key (None: only clear the marker), negative
marker key to delete (None: none), the value key's ARGV in `lua.CACHE_THROUGH_LUA`."""


def through_call(entries: Sequence[ThroughEntry]) -> Call:
    """One `lua.CACHE_THROUGH_LUA` call writing `entries`: value keys, then markers."""
    written = [e for e in entries if e[0] is not None]
    keys: list[bytes] = [k for k, _, _ in written if k is not None]
    keys.extend(neg for _, neg, _ in entries if neg is not None)
    args: list[bytes | int | str] = [len(written)]
    for _, _, a in written:
        args.extend(a)
    return lua.CACHE_THROUGH_SHA, keys, args


def through_chunks(
    entries: Sequence[ThroughEntry], size: int, slot_of: Callable[[bytes], int] | None
) -> list[list[ThroughEntry]]:
    """Runs of at most `size` entries; with `slot_of` (a cluster), one slot per run."""
    if slot_of is None:
        return [list(entries[i : i + size]) for i in range(0, len(entries), size)]
    # A value key and its marker differ before the id, so they usually sit in different
    # slots: each becomes an entry of its own slot.
    by_slot: dict[int, list[ThroughEntry]] = {}
    for key, neg, args in entries:
        if key is not None:
            by_slot.setdefault(slot_of(key), []).append((key, None, args))
        if neg is not None:
            by_slot.setdefault(slot_of(neg), []).append((None, neg, []))
    return [run[i : i + size] for run in by_slot.values() for i in range(0, len(run), size)]


def c_packing(
    cls: type[aioredis.connection.AbstractConnection], kwargs: Mapping[str, Any]
) -> type[aioredis.connection.AbstractConnection]:
    """`cls` packing commands with hiredis's C packer, when hiredis is there and text is UTF-8.

    redis-py's asyncio connections pack in Python, re-joining a growing buffer per
    argument (~2 us an argument); a write-through call has thousands of arguments, and
    packing was about half of `write_through`'s CPU. hiredis packs the same bytes (checked
    by tests/unit/test_redis_layout.py); anything it refuses goes the Python way.
    """
    encoding = str(kwargs.get("encoding", "utf-8")).lower().replace("_", "-")
    pack = _hiredis_pack
    if pack is None or encoding not in ("utf-8", "utf8"):
        return cls
    if kwargs.get("encoding_errors", "strict") != "strict":
        return cls
    packer: Callable[[tuple[Any, ...]], bytes] = pack

    class Packed(cls):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            first = args[0]
            if isinstance(first, str):
                args = (*first.encode().split(), *args[1:])
            elif b" " in first:
                args = (*first.split(), *args[1:])
            try:
                return [packer(args)]
            except TypeError:  # a type hiredis does not pack: redis-py's error
                return list(super().pack_command(*args))

    Packed.__name__ = Packed.__qualname__ = f"CPacked{cls.__name__}"
    return Packed


# ---------------------------------------------------------------- errors


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Redis and socket errors -> StoreError / TransientStoreError."""
    try:
        yield
    except _PERMANENT as exc:
        raise StoreError(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc
    except _TRANSIENT as exc:
        raise TransientStoreError(f"redis {what} failed, may succeed if retried: {exc}") from exc
    except rx.RedisError as exc:
        raise StoreError(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc


def _first_error(results: Sequence[Any], what: str) -> None:
    for res in results:
        if isinstance(res, Exception):
            with _translated(what):
                raise res


# ---------------------------------------------------------------- the store


class RedisStore(Store):
    """Feature items in Redis, laid out as the module docstring says."""

    name = "redis"

    def __init__(
        self,
        catalog: Catalog,
        url: str,
        *,
        clock: Clock = wall_clock_ms,
        prefix: str = "fp:",
        client: aioredis.Redis | None = None,
        rand: Rand = random.random,
    ) -> None:
        super().__init__(catalog, clock)
        self.rand = rand
        self.url = url
        self.prefix = prefix
        self._given = client
        self._client: aioredis.Redis | None = None

    # -- lifecycle

    async def start(self) -> None:
        if self._client is not None:
            return
        # Querystring options in `url` (socket_timeout=...) win over these defaults.
        if self._given is not None:
            self._client = self._given
        else:
            pool = aioredis.ConnectionPool.from_url(
                self.url, decode_responses=False, socket_timeout=5.0, socket_connect_timeout=5.0
            )
            pool.connection_class = c_packing(pool.connection_class, pool.connection_kwargs)
            self._client = aioredis.Redis(connection_pool=pool)
        try:
            if self._client.connection_pool.connection_kwargs.get("decode_responses"):
                raise StoreError("RedisStore needs a client with decode_responses=False")
            await self._load_scripts()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Close the client if this store created it; a client passed in stays open."""
        client, self._client = self._client, None
        if client is not None and client is not self._given:
            await client.aclose()

    async def ping(self) -> None:
        client = self._redis()
        try:
            await client.ping()
        except (rx.RedisError, OSError) as exc:
            raise TransientStoreError(f"redis at {self._where()} does not answer: {exc}") from exc

    # -- writes

    async def write(self, items: Sequence[Item]) -> None:
        calls = self._plan(items)
        if not calls:
            return
        client = self._redis()
        pending = calls
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for sha, key, args in pending:
                pipe.evalsha(sha, 1, key, *args)
            with _translated("write"):
                results = await pipe.execute(raise_on_error=False)
            # NOSCRIPT after a restart or SCRIPT FLUSH: reload and rerun only those calls,
            # which is safe because every script call is idempotent.
            missing = [
                c for c, r in zip(pending, results, strict=True) if isinstance(r, rx.NoScriptError)
            ]
            _first_error([r for r in results if not isinstance(r, rx.NoScriptError)], "write")
            if not missing:
                return
            if attempt == 0:
                await self._load_scripts()
                pending = missing
        raise StoreError("redis write failed: scripts missing on the server after reloading them")

    def _plan(self, items: Sequence[Item]) -> list[tuple[str, bytes, list[bytes | int | str]]]:
        """One (script sha, key, args) per key of the batch, in first-seen order."""
        by_key: dict[tuple[str, str], list[Item]] = {}
        for item in items:
            by_key.setdefault((item.group, item.id), []).append(item)
        calls: list[tuple[str, bytes, list[bytes | int | str]]] = []
        now = self.clock()
        for (group_name, entity_id), batch in by_key.items():
            group = self._group(group_name)
            key = key_of(self.prefix, group_name, entity_id)
            if group.kind == "latest":
                calls.append((lua.LATEST_SHA, key, [member_of(latest_winner(batch))]))
                continue
            cutoff = self.cutoff(group)
            members = timeseries_members(batch, group.max_items, cutoff)
            if not members:
                continue
            low = version_bounds(cutoff, None)[0] if cutoff is not None else ""
            retention = "" if group.retention is None else group.retention
            args: list[bytes | int | str] = [group.max_items, low, now, retention]
            calls.append((lua.TIMESERIES_SHA, key, [*args, *members]))
        return calls

    # -- cache writes

    async def write_through(self, items: Sequence[Item]) -> None:
        """Write items to the cache tier (ingestion's write-through).

        latest: newest wins, as `write`. timeseries: appended only to keys that already
        exist (a cached key holds the store's newest items, so it is never created from a
        partial batch), capped at `max_items`. Written keys expire after the group's hard
        TTL (with jitter); every (group, id) loses its negative marker. Groups that are
        on-demand, not cached in Redis, or `write: around` only lose their markers.

        One script call writes up to `THROUGH_KEYS` pairs (KEYS and ARGV flattened): the
        client's CPU per call, not Redis, bounded the per-key calls. Under Redis Cluster
        (a `RedisCluster` client) the pairs are grouped by hash slot first, as a
        multi-key script needs.
        """
        by_key: dict[tuple[str, str], list[Item]] = {}
        for item in items:
            by_key.setdefault((item.group, item.id), []).append(item)
        if not by_key:
            return
        prefix, neg_prefix = self.prefix, self.prefix + "neg:"
        # (value key or None, negative key, ARGV of the value key)
        entries: list[tuple[bytes | None, bytes, list[bytes | int | str]]] = []
        for (group_name, entity_id), batch in by_key.items():
            group = self._group(group_name)
            neg = key_of(neg_prefix, group_name, entity_id)
            if group.on_demand or group.write == "around" or "redis" not in group.tiers:
                entries.append((None, neg, []))
                continue
            key = key_of(prefix, group_name, entity_id)
            ttl = jittered(group.ttl.hard, group.ttl.jitter, self.rand())
            if group.kind == "latest":
                entries.append((key, neg, [b"l", ttl, member_of(latest_winner(batch))]))
                continue
            cutoff = self.cutoff(group)
            members = timeseries_members(batch, group.max_items, cutoff)
            if not members:
                entries.append((None, neg, []))
                continue
            low = version_bounds(cutoff, None)[0] if cutoff is not None else ""
            entries.append((key, neg, [b"t", ttl, group.max_items, low, len(members), *members]))
        calls = [
            through_call(chunk) for chunk in through_chunks(entries, THROUGH_KEYS, self._slot_of())
        ]
        await self._run_scripts(calls, [])

    async def fill(self, fills: Sequence[CacheFill]) -> None:
        """Merge what the store answered into the cache (serving's background write-back).

        A timeseries fill must carry the store's newest `max_items` records (fewer only when
        the store holds fewer), so the key keeps its completeness rule. An empty fill
        writes a negative marker instead.
        """
        calls: list[Call] = []
        markers: list[tuple[bytes, int]] = []
        for f in fills:
            group = self._group(f.group)
            if not f.records:
                markers.append((negative_key_of(self.prefix, f.group, f.id), f.negative_ttl_ms))
                continue
            key = key_of(self.prefix, f.group, f.id)
            ttl = jittered(group.ttl.hard, group.ttl.jitter, self.rand())
            if group.kind == "latest":
                best = max(f.records, key=lambda r: r.version)
                calls.append((lua.CACHE_LATEST_SHA, [key], [_stored(best), ttl]))
                continue
            cutoff = self.cutoff(group)
            low = version_bounds(cutoff, None)[0] if cutoff is not None else ""
            members = [_stored(r) for r in f.records[: group.max_items]]
            calls.append(
                (lua.CACHE_TIMESERIES_SHA, [key], [group.max_items, low, ttl, "0", *members])
            )
        await self._run_scripts(calls, markers)

    async def read_cached(self, keys: Sequence[tuple[str, str]]) -> list[Cached]:
        """Every cached member, PTTL and negative marker of each (group, id): one round trip.

        One script call reads the whole batch: redis-py spends far more CPU per command
        than Redis does, so 1 command beats a pipeline of 3 a pair. It is a multi-key
        script; under Redis Cluster the batch would have to be split by hash slot.
        """
        if not keys:
            return []
        names: list[bytes] = []
        kinds: list[str] = []
        for group_name, entity_id in keys:
            group = self._group(group_name)
            names.append(key_of(self.prefix, group_name, entity_id))
            names.append(negative_key_of(self.prefix, group_name, entity_id))
            kinds.append("l" if group.kind == "latest" else "t")
        client = self._redis()
        with _translated("cache read"):
            try:
                results = await client.evalsha(lua.CACHE_READ_SHA, len(names), *names, *kinds)
            except rx.NoScriptError:
                await self._load_scripts()
                results = await client.evalsha(lua.CACHE_READ_SHA, len(names), *names, *kinds)
        out: list[Cached] = []
        for i in range(0, len(results), 3):
            value, pttl, neg = results[i : i + 3]
            if value is None or value == []:
                records = []
            elif isinstance(value, bytes):
                records = [record_of(value)]
            else:
                records = [record_of(m) for m in value]
            out.append(
                Cached(
                    records,
                    int(pttl) if records and pttl >= 0 else None,
                    int(neg) if neg >= 0 else None,
                )
            )
        return out

    async def _run_scripts(self, calls: list[Call], markers: list[tuple[bytes, int]]) -> None:
        """Script calls and negative markers in one pipeline; reload scripts once."""
        if not calls and not markers:
            return
        client = self._redis()
        pending = calls
        extra = True
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for sha, keys, args in pending:
                pipe.evalsha(sha, len(keys), *keys, *args)
            if extra:
                for key, ttl in markers:
                    pipe.set(key, b"", px=max(1, ttl))
            with _translated("cache write"):
                results = await pipe.execute(raise_on_error=False)
            mine = results[: len(pending)]
            missing = [
                c for c, r in zip(pending, mine, strict=True) if isinstance(r, rx.NoScriptError)
            ]
            _first_error([r for r in results if not isinstance(r, rx.NoScriptError)], "cache write")
            if not missing:
                return
            if attempt == 0:
                await self._load_scripts()
                pending, extra = missing, False
        raise StoreError("redis cache write failed: scripts missing after reloading them")

    def _slot_of(self) -> Callable[[bytes], int] | None:
        """Hash slot of a key when the client is a cluster client, else None."""
        return key_slot if isinstance(self._redis(), RedisCluster) else None

    # -- reads

    async def read(self, queries: Sequence[Query]) -> list[list[Record]]:
        if not queries:
            return []
        pipe = self._redis().pipeline(transaction=False)
        sent: list[bool] = []
        for q in queries:
            group = self._group(q.group)
            key = key_of(self.prefix, q.group, q.id)
            if group.kind == "latest":
                pipe.get(key)
                sent.append(True)
                continue
            limit, since, until = self.clamp(group, q)
            if limit < 1 or (since is not None and until is not None and since > until):
                sent.append(False)
                continue
            high, low = lex_range(since, until)
            pipe.zrevrangebylex(key, high, low, start=0, num=limit)
            sent.append(True)
        results: list[Any] = []
        if any(sent):
            with _translated("read"):
                results = await pipe.execute(raise_on_error=False)
            _first_error(results, "read")
        answers = iter(results)
        out: list[list[Record]] = []
        for was_sent in sent:
            res = next(answers) if was_sent else None
            if res is None:
                out.append([])
            elif isinstance(res, bytes):
                out.append([record_of(res)])
            else:
                out.append([record_of(m) for m in res])
        return out

    # -- helpers

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise StoreError("RedisStore is not started: call start() or use `async with`")
        return self._client

    def _where(self) -> str:
        kw = self._redis().connection_pool.connection_kwargs
        return f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}"

    def _group(self, name: str) -> FeatureGroup:
        group = self.catalog.groups.get(name)
        if group is None:
            raise ValidationError(f"unknown feature group {name!r}")
        return group

    async def _load_scripts(self) -> None:
        client = self._redis()
        with _translated("script load"):
            for script, sha in lua.SCRIPTS:
                if str(await client.script_load(script)) != sha:
                    raise StoreError("redis returned an unexpected SHA1 for a loaded script")

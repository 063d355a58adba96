"""The embedded store for one machine: SQLite in WAL mode.

One file, `<data_dir>/features.db`, shared by one writing process (ingest)
and any number of reading processes (serving).
WAL lets readers run while the writer commits; every `write` is one
transaction, so what it acknowledged survives `kill -9` of any process.

It also survives a power loss: `synchronous=FULL` (the default) syncs the WAL
at every commit, one fsync a write (an ingest batch). Ingest commits a batch's
Kafka offsets after its write, so with `NORMAL`, which syncs the WAL only at
checkpoints (every `checkpoint_pages`, ~40 MiB, a few batches), a power loss
or kernel crash would roll the store back to a point where those batches'
offsets were already committed: their events lost, never read again (the file
stays consistent; `kill -9` loses nothing either way). FULL cost nothing
measurable in `bench/ingest.py` (the commit is on the store's thread while the
next batch is prepared; 8,027 vs 7,947 events/s store-only, one back-to-back
run), so at-least-once holds across power losses too. `OFF` is not offered: it
skips the checkpoints' syncs, and a power loss could then corrupt the file.

SQLite was chosen over LMDB by `bench/embedded_engines.py`: LMDB reads are
1.5-3x faster (9 vs 15 us for 30 items), but both are far below an HTTP
request's cost, and SQLite needs no fixed map size, no reader-slot care after
a crashed reader, and no extra dependency.

Layout: `items(pk BLOB, sk TEXT, ts INTEGER, ver TEXT, v BLOB)`, primary key
(pk, sk), as `keys` describes. One upsert serves both kinds: it overwrites
only when the incoming version is not older (`keys.replaces`, in SQL), which
for timeseries (where ver = sk) always holds and for latest makes the newest
version win.

Items past their group's `retention` are hidden on read and deleted by the
writing process: after a write, when a purge is due, one bounded pass walks
the keys of groups with retention in order, from where the last pass stopped,
and deletes the expired (oldest) items of each, in its own transaction on the
writer's connection (readers in WAL mode are never blocked by it). A pass does
at most max(`purge_batch`, twice the items just written) work, keys visited
plus items deleted, so a pass stopped by its budget leaves the next one due at
once and purging outpaces writing. A finished sweep waits `purge_every_ms`
(10 minutes: a sweep costs ~10 us a key, ~10 s for a million keys, so ~2% of
the writer's time; expired items are hidden meanwhile). SQLite reuses the
freed pages, so under steady churn the file stops growing. Nothing else is
deleted: items beyond `max_items` stay readable with `until` until they
expire, timeseries without retention keep everything, and groups no longer
in the spec are left alone. The counter `featureplane_store_items_purged` and
the gauge `featureplane_store_file_bytes{file="db"|"wal"}` (in the default
Prometheus registry, which ingest serves) show it, and an INFO line at most
once a minute sums it up.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import starmap
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, TypeVar

from prometheus_client import Counter, Gauge

from featureplane.codec import Item, Record
from featureplane.errors import NotStartedError, StoreError, TransientStoreError
from featureplane.keys import NULL_SK, partition_key
from featureplane.spec import Catalog
from featureplane.stores.base import Clock, Query, Store, oldest_kept, wall_clock_ms, window

__all__ = ["EmbeddedStore"]

T = TypeVar("T")
log = logging.getLogger(__name__)

PURGED = Counter("featureplane_store_items_purged", "Expired items deleted from the embedded store")
FILE_BYTES = Gauge(
    "featureplane_store_file_bytes", "Size of the embedded store's files (db, wal)", ["file"]
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    pk BLOB NOT NULL, sk TEXT NOT NULL, ts INTEGER NOT NULL, ver TEXT NOT NULL, v BLOB NOT NULL,
    PRIMARY KEY (pk, sk)
) WITHOUT ROWID
"""
_UPSERT = """
INSERT INTO items (pk, sk, ts, ver, v) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (pk, sk) DO UPDATE SET ts = excluded.ts, ver = excluded.ver, v = excluded.v
WHERE excluded.ver >= items.ver
"""  # the WHERE is keys.replaces(excluded.ver, items.ver)
_RANGE = """
SELECT ts, ver, v FROM items WHERE pk = ? AND sk BETWEEN ? AND ? ORDER BY sk DESC LIMIT ?
"""
_LATEST = "SELECT ts, ver, v FROM items WHERE pk = ? AND sk = ?"
# The next keys after :after below :high (a skip scan, one seek a key, in SQLite rather
# than one statement a key from Python: 9 instead of 36 us a key), each with whether it
# holds an item older than :cut.
_SCAN_KEYS = """
WITH RECURSIVE keys(pk) AS (
    SELECT (SELECT pk FROM items WHERE pk > :after AND pk < :high ORDER BY pk LIMIT 1)
    UNION ALL
    SELECT (SELECT pk FROM items WHERE pk > keys.pk AND pk < :high ORDER BY pk LIMIT 1)
    FROM keys WHERE keys.pk IS NOT NULL LIMIT :n
)
SELECT pk, EXISTS (SELECT 1 FROM items WHERE items.pk = keys.pk AND sk < :cut) FROM keys
WHERE pk IS NOT NULL
"""
_PURGE_KEY = """
DELETE FROM items WHERE pk = ? AND sk IN (
    SELECT sk FROM items WHERE pk = ? AND sk < ? ORDER BY sk LIMIT ?)
"""
_INLINE_READS = 64  # larger reads go to a thread so the event loop stays free
# The writer's tuning, measured on the ingest write shape (bench/ingest.py rows, 2,000-event
# transactions, 300k events): 28.9k -> 43.4k events/s. Its page cache holds the upper
# B-tree levels and hot leaves (SQLite's default is 2 MB); checkpointing every 10,000
# pages (~40 MB of WAL) instead of 1,000 copies a leaf touched by several commits back
# to the database once. mmap_size, temp_store and page sizes of 1-2 KiB measured no
# better or worse.
# journal_size_limit: after a checkpoint the WAL file is cut back to 64 MiB instead of
# keeping the size of its largest burst.
_WRITER_PRAGMAS = ("PRAGMA cache_size = -65536", "PRAGMA journal_size_limit = 67108864")


_ROW_KEY = itemgetter(0, 1)


def _pk(group: str, entity_id: str) -> bytes:
    return partition_key(group, entity_id).encode("utf-8")


class EmbeddedStore(Store):
    """SQLite-backed store; safe for one writer process and many reader processes."""

    name = "embedded"

    def __init__(
        self,
        catalog: Catalog,
        data_dir: str | Path,
        *,
        clock: Clock = wall_clock_ms,
        synchronous: Literal["NORMAL", "FULL"] = "FULL",
        checkpoint_pages: int = 10_000,
        purge_batch: int = 2_000,
        purge_every_ms: int = 600_000,
    ) -> None:
        """`checkpoint_pages`: WAL pages between checkpoints. `purge_batch`: the work of one
        purge pass (keys visited + items deleted). `purge_every_ms`: pause after a sweep."""
        super().__init__(catalog, clock)
        self.path = Path(data_dir) / "features.db"
        self.synchronous = synchronous
        self.checkpoint_pages = checkpoint_pages
        self.purge_batch = purge_batch
        self.purge_every_ms = purge_every_ms
        self.purged = 0  # items deleted by this process, in total
        self._purge_from = b""  # the pass resumes after this key
        self._purge_due = 0  # clock time of the next pass
        self._purging = False
        self._logged_at, self._logged_purged = clock(), 0
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._pool: ThreadPoolExecutor | None = None
        # each group's partition key of an empty id, encoded: an item's key is it + its id's
        # UTF-8 (the same bytes as _pk's, without two calls an item)
        self._prefixes = {name: _pk(name, "") for name in catalog.groups}
        self._latest = frozenset(n for n, g in catalog.groups.items() if g.kind == "latest")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute(f"PRAGMA synchronous = {self.synchronous}")
        return db

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fp-embedded")
        try:
            writer = self._connect()
            writer.execute("PRAGMA journal_mode = WAL")
            for pragma in _WRITER_PRAGMAS:
                writer.execute(pragma)
            writer.execute(f"PRAGMA wal_autocheckpoint = {int(self.checkpoint_pages)}")
            writer.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open embedded store {self.path}: {exc}") from exc
        self._writer, self._reader = writer, self._connect()

    async def aclose(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=True)
            self._pool = None
        for db in (self._reader, self._writer):
            if db is not None:
                db.close()
        self._reader = self._writer = None

    def _db(self, writer: bool = False) -> sqlite3.Connection:
        """The reader's (or writer's) connection; `NotStartedError` when closed."""
        db = self._writer if writer else self._reader
        if db is None:
            raise NotStartedError("EmbeddedStore")
        return db

    async def ping(self) -> None:
        await self._run(self._ping)

    def _ping(self) -> None:
        # on the pool's thread, so on the pool's connection: the reader belongs to the event
        # loop's thread, where a read may hold a transaction open across its queries
        self._db(writer=True).execute("SELECT 1 FROM items LIMIT 1").fetchall()

    async def write(self, items: Sequence[Item]) -> None:
        if not items:
            return
        latest, prefixes = self._latest, self._prefixes  # set and dict lookups, no catalog's
        try:
            rows = [
                (
                    prefixes[it.group] + it.id.encode(),
                    NULL_SK if it.group in latest else it.version,
                    it.ts,
                    it.version,
                    it.value,
                )
                for it in items
            ]
        except KeyError:
            for it in items:
                self.group(it.group)  # raises UnknownGroupError
            raise
        # Key order makes neighbouring upserts share B-tree pages. The sort is stable, so
        # rows of one key keep their batch order (it decides ties of equal versions).
        rows.sort(key=_ROW_KEY)
        await self._run(self._transaction, self._write, rows)
        if self.clock() >= self._purge_due and not self._purging:
            self._purging = True  # concurrent writes: one pass at a time
            try:
                await self.purge_expired(2 * len(rows))
            except StoreError as exc:  # the write is done; purging waits for the next one
                log.warning("embedded store: purge failed, retried after the next write: %s", exc)
            finally:
                self._purging = False

    def _transaction(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in one write transaction on the writer's connection."""
        db = self._db(writer=True)
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(*args)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    def _write(self, rows: list[tuple[bytes, str, int, str, bytes]]) -> None:
        self._db(writer=True).executemany(_UPSERT, rows)

    async def read(self, queries: Sequence[Query]) -> list[list[Record]]:
        if len(queries) <= _INLINE_READS:
            try:
                return self._read(queries)
            except sqlite3.Error as exc:
                raise _error(exc) from exc
        # Large reads run on the writer's thread and connection, off the event loop.
        return await self._run(self._read, queries, True)

    def _read(self, queries: Sequence[Query], on_writer: bool = False) -> list[list[Record]]:
        db = self._db(writer=on_writer)
        if len(queries) == 1:
            return self._select(db, queries)
        # One read transaction for all the queries, so they read one snapshot, and the WAL
        # read lock is taken once, not once a statement (3 queries: ~69 -> 64 us).
        db.execute("BEGIN")
        try:
            return self._select(db, queries)
        finally:
            db.execute("COMMIT")

    def _select(self, db: sqlite3.Connection, queries: Sequence[Query]) -> list[list[Record]]:
        now = self.clock()
        out: list[list[Record]] = []
        for q in queries:
            group = self.group(q.group)
            pk = _pk(q.group, q.id)
            if group.kind == "latest":
                rows = db.execute(_LATEST, (pk, NULL_SK)).fetchall()
            elif (win := window(group, q, now)) is not None:
                rows = db.execute(_RANGE, (pk, win.low, win.high, win.limit)).fetchall()
            else:
                rows = []
            out.append(list(starmap(Record, rows)))  # no Python loop a row
        return out

    async def purge_expired(self, budget: int = 0) -> int:
        """One purge pass of at most max(`budget`, `purge_batch`) work (keys visited + items
        deleted; see the module docstring); returns the items deleted."""
        ranges = []  # (first key, end of keys, oldest version kept) of each group with retention
        now = self.clock()
        for group in self.catalog.groups.values():
            if low := oldest_kept(group, now):
                name = group.name.encode()  # [A-Za-z0-9_]: the ranges sort as the names do
                ranges.append((name + b"#", name + b"$", low))
        limit = max(budget, self.purge_batch)
        result: tuple[int, bytes, bool] = await self._run(
            self._transaction, self._purge, sorted(ranges), self._purge_from, limit
        )
        deleted, self._purge_from, done = result
        now = self.clock()
        self._purge_due = now + self.purge_every_ms if done else now
        self.purged += deleted
        PURGED.inc(deleted)
        sizes = self._file_sizes()
        if now - self._logged_at >= 60_000 and self.purged > self._logged_purged:
            log.info(
                "embedded store: purged %d expired items in %.0f s; db %.1f MiB, wal %.1f MiB",
                self.purged - self._logged_purged,
                (now - self._logged_at) / 1000,
                sizes["db"] / 2**20,
                sizes["wal"] / 2**20,
            )
            self._logged_at, self._logged_purged = now, self.purged
        return deleted

    def _purge(
        self, ranges: list[tuple[bytes, bytes, str]], start: bytes, limit: int
    ) -> tuple[int, bytes, bool]:
        """Delete expired items key by key after `start`: (deleted, resume after, sweep done).
        Each key visited and each item deleted is one unit of work, `limit` in all."""
        db = self._db(writer=True)
        work = deleted = 0
        after = start
        for low, high, cut in ranges:
            after = max(after, low)
            while after < high:
                if work >= limit:
                    return deleted, after, False
                scan = {"after": after, "high": high, "n": min(limit - work, 256), "cut": cut}
                keys = db.execute(_SCAN_KEYS, scan).fetchall()
                if not keys:
                    break
                for pk, expired in keys:
                    work += 1
                    if expired:
                        left = limit - work
                        n: int = db.execute(_PURGE_KEY, (pk, pk, cut, left)).rowcount if left else 0
                        deleted, work = deleted + n, work + n
                        if n == left:  # maybe more: the next pass starts at this key
                            return deleted, after, False
                    after = pk
        return deleted, b"", True

    def _file_sizes(self) -> dict[str, int]:
        sizes = {}
        for name in ("db", "wal"):
            path = self.path if name == "db" else self.path.with_name(self.path.name + "-wal")
            try:
                sizes[name] = path.stat().st_size
            except OSError:
                sizes[name] = 0
            FILE_BYTES.labels(name).set(sizes[name])
        return sizes

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            raise NotStartedError("EmbeddedStore")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as exc:
            raise _error(exc) from exc


def _error(exc: sqlite3.Error) -> StoreError:
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        return TransientStoreError(f"embedded store busy: {text}")
    return StoreError(f"embedded store: {text}")

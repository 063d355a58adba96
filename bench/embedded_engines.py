"""Pick the embedded store's engine by measurement: SQLite (WAL) vs LMDB.

Same data in both (10,000 ids x 30 timeseries items of ~120 bytes, 10,000
latest values), then: batched writes/s, latest point reads/s, newest-30
range reads/s. Prints one table. Run: python bench/embedded_engines.py
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable

import lmdb

IDS, PER_ID, VALUE = 10_000, 30, os.urandom(60).hex().encode()


def timed(fn: Callable[[], object], n: int) -> tuple[float, float, float]:
    lat = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    lat.sort()
    return n / total, lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6


def sqlite_engine(path: str) -> dict[str, tuple[float, float, float]]:
    db = sqlite3.connect(os.path.join(path, "s.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE items (pk BLOB, sk BLOB, v BLOB, PRIMARY KEY (pk, sk)) WITHOUT ROWID")
    rows = [
        (f"g#{i}".encode(), f"{1763800000000 + j:013d}#abcdef".encode(), VALUE)
        for i in range(IDS)
        for j in range(PER_ID)
    ]
    t = time.perf_counter()
    for k in range(0, len(rows), 1000):
        db.execute("BEGIN")
        db.executemany("INSERT OR REPLACE INTO items VALUES (?,?,?)", rows[k : k + 1000])
        db.execute("COMMIT")
    write = len(rows) / (time.perf_counter() - t)
    rnd = random.Random(1)
    q_range = "SELECT sk, v FROM items WHERE pk=? AND sk BETWEEN ? AND ? ORDER BY sk DESC LIMIT 30"
    q_point = "SELECT v FROM items WHERE pk=? AND sk=?"
    out = {"write items/s": (write, 0.0, 0.0)}
    out["range 30"] = timed(
        lambda: db.execute(q_range, (f"g#{rnd.randrange(IDS)}".encode(), b"0", b"9")).fetchall(),
        20000,
    )
    out["point"] = timed(
        lambda: db.execute(
            q_point, (f"g#{rnd.randrange(IDS)}".encode(), f"{1763800000000:013d}#abcdef".encode())
        ).fetchall(),
        50000,
    )
    return out


def lmdb_engine(path: str) -> dict[str, tuple[float, float, float]]:
    env = lmdb.open(path, map_size=1 << 34, sync=True, metasync=True)
    rows = [
        (f"g#{i}".encode() + b"\x00" + f"{1763800000000 + j:013d}#abcdef".encode(), VALUE)
        for i in range(IDS)
        for j in range(PER_ID)
    ]
    t = time.perf_counter()
    for k in range(0, len(rows), 1000):
        with env.begin(write=True) as txn:
            for key, v in rows[k : k + 1000]:
                txn.put(key, v)
    write = len(rows) / (time.perf_counter() - t)
    rnd = random.Random(1)

    def rng() -> list[tuple[bytes, bytes]]:
        pk = f"g#{rnd.randrange(IDS)}".encode() + b"\x00"
        out = []
        with env.begin() as txn:
            cur = txn.cursor()
            if not cur.set_range(pk + b"\xff"):
                cur.last()
            else:
                cur.prev()
            while len(out) < 30 and cur.key().startswith(pk):
                out.append((cur.key(), cur.value()))
                if not cur.prev():
                    break
        return out

    def point() -> bytes | None:
        with env.begin() as txn:
            return txn.get(
                f"g#{rnd.randrange(IDS)}".encode()
                + b"\x00"
                + f"{1763800000000:013d}#abcdef".encode()
            )

    out = {"write items/s": (write, 0.0, 0.0)}
    out["range 30"] = timed(rng, 20000)
    out["point"] = timed(point, 50000)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        results = {"sqlite-wal": sqlite_engine(a), "lmdb": lmdb_engine(b)}
    print(f"{'engine':<12}{'op':<16}{'ops/s':>12}{'p50 us':>10}{'p99 us':>10}")
    for engine, ops in results.items():
        for op, (rate, p50, p99) in ops.items():
            print(f"{engine:<12}{op:<16}{rate:>12,.0f}{p50:>10.1f}{p99:>10.1f}")


if __name__ == "__main__":
    main()

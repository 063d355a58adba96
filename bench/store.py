"""Store backends side by side: write and read throughput, read latency.

For each backend (embedded SQLite, Redis, DynamoDB on dynalite) it loads
`--ids` ids with 30 timeseries items and one latest value each, then runs
reads from `--concurrency` tasks for `--seconds`: the newest 30 items of a
timeseries id, and one latest value. The baseline is a bare redis.asyncio
client doing ZREVRANGEBYLEX / GET on the very same keys and bytes, in the
same run, so the table shows what the store layer costs over raw Redis.

    python bench/store.py [--ids 2000] [--seconds 5] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from featureplane.codec import make_item
from featureplane.spec import load_catalog
from featureplane.stores.base import Query, Store
from featureplane.stores.dynamodb import DynamoStore
from featureplane.stores.embedded import EmbeddedStore
from featureplane.stores.redis import RedisStore
from featureplane.stores.redis_layout import key_of, lex_range

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the service launchers live beside the tests

from tests.services import start_dynalite, start_redis  # noqa: E402

CATALOG_YAML = """
feature_groups:
  - name: clicks
    entity: user
    kind: timeseries
    features:
      - {name: article_id, type: string}
      - {name: session_id, type: string}
      - {name: category, type: string}
  - name: keywords
    entity: user
    kind: latest
    features:
      - {name: keywords, type: "set<string>"}
      - {name: updated_by, type: string}
"""
T0 = 1_763_800_000_000


async def load(store: Store, ids: int) -> float:
    """Write every item in batches of 100; returns items/s."""
    clicks, kw = store.catalog.group("clicks"), store.catalog.group("keywords")
    items = []
    for i in range(ids):
        for k in range(30):
            feats = {
                "article_id": f"article-{i * 31 + k}",
                "session_id": f"s{i}",
                "category": "bike",
            }
            items.append(make_item(clicks, f"user-{i}", T0 + k * 1000, f"c{i}-{k}", feats))
        feats = {"keywords": ["bike", "sofa", f"kw{i}"], "updated_by": "app"}
        items.append(make_item(kw, f"user-{i}", T0, f"k{i}", feats))
    start = time.perf_counter()
    for b in range(0, len(items), 100):
        await store.write(items[b : b + 100])
    return len(items) / (time.perf_counter() - start)


async def drive(op: Callable[[int], Awaitable[object]], ids: int, seconds: float, conc: int):
    """Run `op(random id)` from `conc` tasks; returns (ops/s, p50 ms, p99 ms)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        rnd = random.Random(seed)
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await op(rnd.randrange(ids))
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker(s) for s in range(conc)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return (
        len(latencies) / elapsed,
        latencies[len(latencies) // 2] * 1e3,
        latencies[int(len(latencies) * 0.99)] * 1e3,
    )


async def bench_store(store: Store, args: argparse.Namespace) -> dict[str, tuple[float, ...]]:
    async with store:
        write = await load(store, args.ids)
        ts = await drive(
            lambda i: store.read([Query("clicks", f"user-{i}", limit=30)]),
            args.ids,
            args.seconds,
            args.concurrency,
        )
        latest = await drive(
            lambda i: store.read([Query("keywords", f"user-{i}")]),
            args.ids,
            args.seconds,
            args.concurrency,
        )
    return {"write": (write,), "ts30": ts, "latest": latest}


async def bench_raw_redis(
    url: str, prefix: str, args: argparse.Namespace
) -> dict[str, tuple[float, ...]]:
    client = aioredis.Redis.from_url(url)
    high, low = lex_range(None, None)
    try:
        ts = await drive(
            lambda i: client.zrevrangebylex(
                key_of(prefix, "clicks", f"user-{i}"), high, low, start=0, num=30
            ),
            args.ids,
            args.seconds,
            args.concurrency,
        )
        latest = await drive(
            lambda i: client.get(key_of(prefix, "keywords", f"user-{i}")),
            args.ids,
            args.seconds,
            args.concurrency,
        )
    finally:
        await client.aclose()
    return {"write": (float("nan"),), "ts30": ts, "latest": latest}


async def main(args: argparse.Namespace) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(CATALOG_YAML)
    catalog = load_catalog(f.name)
    redis_svc, dyn_svc = start_redis(), start_dynalite()
    url = f"redis://{redis_svc.address}/0"
    prefix = f"b{uuid.uuid4().hex[:6]}:"
    results: dict[str, dict[str, tuple[float, ...]]] = {}
    try:
        with tempfile.TemporaryDirectory() as data:
            stores: dict[str, Store] = {
                "embedded": EmbeddedStore(catalog, Path(data)),
                "redis": RedisStore(catalog, url, prefix=prefix),
                "dynamodb-local": DynamoStore(
                    catalog,
                    endpoint_url=f"http://{dyn_svc.address}",
                    table=f"bench{uuid.uuid4().hex[:6]}",
                ),
            }
            for name in args.backends.split(","):
                print(f"... {name}", flush=True)
                results[name] = await bench_store(stores[name], args)
        if "redis" in results:
            print("... raw redis client (baseline)", flush=True)
            results["raw redis (baseline)"] = await bench_raw_redis(url, prefix, args)
    finally:
        redis_svc.cleanup()
        dyn_svc.cleanup()
        Path(f.name).unlink()

    print(
        f"\n{args.ids} ids x (30 timeseries items + 1 latest); reads from "
        f"{args.concurrency} concurrent tasks for {args.seconds:.0f}s each\n"
    )
    head = f"{'backend':<22}{'write items/s':>14}{'ts30 reads/s':>14}{'p50 ms':>8}{'p99 ms':>8}"
    print(head + f"{'latest reads/s':>16}{'p50 ms':>8}{'p99 ms':>8}")
    for name, r in results.items():
        (w,), (t, tp50, tp99), (lt, lp50, lp99) = r["write"], r["ts30"], r["latest"]
        write = "-" if w != w else f"{w:,.0f}"
        print(
            f"{name:<22}{write:>14}{t:>14,.0f}{tp50:>8.2f}{tp99:>8.2f}"
            f"{lt:>16,.0f}{lp50:>8.2f}{lp99:>8.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--backends", default="embedded,redis,dynamodb-local")
    asyncio.run(main(parser.parse_args()))

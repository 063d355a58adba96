"""Benchmark of the local tier's invalidation: how soon a write is served, at what hit rate.

    python bench/invalidation.py [--duration 15] [--ids 10000] [--rate 1000] [--rounds 2]
                                 [--only off,drop,...] [--long-soft 4m] [--load-items N]

Set-up: its own redis-server, the embedded store, one latest group with tiers
[local, redis, store] and the demo's TTLs (soft 30 s, hard 5 m), `--ids` ids loaded.
For each mode a `featureplane serve` process (one worker) is started and its local tier
warmed with every id; then, for `--duration` seconds at once:

- wrk (-t1, `--connections` 32) reads random ids (GET /v1/features/last/<id>): the RPS;
- a `Writer` in this process writes `--rate` items/s over the ids through the store and
  Redis, a batch every 100 ms (ingestion's shape: one message a batch);
- after each batch returns, one of its ids is polled (every 2 ms) until the server
  answers the new value: write returned -> new value served, p50/p99 (cut at 2 s).

The local hit rate is the server's own count over the run: local hits / (hits + misses
+ unanswerable) of the group. Modes: `off` (today: values live their soft TTL), `drop`,
`refresh` (featureplane/invalidation.py, serving/invalidate.py), and both with a long
local soft TTL (`FEATUREPLANE_SERVE_LOCAL_SOFT_TTL`, `--long-soft`).

A last row: a load of `--load-items` items through the Writer, with the group's local
tier (so every batch is published) against the same group without one (nothing is),
back to back: what publishing costs a batch load.

The machine's cores are shared by wrk, redis-server, the server and this process: the
figures move with whatever else runs; compare rows of one run. The modes take turns,
`--rounds` times, so a busy spell of the machine spreads over all of them; the RPS
column is their mean, with the lowest and highest run.

The probe's time includes its own HTTP request queued behind wrk's 32 connections on a
saturated server (about 32 / RPS): it is what a client sees, not the channel's delay.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serve_kit import wait_up  # noqa: E402
from featureplane.codec import Item, make_item  # noqa: E402
from featureplane.operators.policy import RetryInPlace  # noqa: E402
from featureplane.operators.write import Writer  # noqa: E402
from featureplane.spec import Catalog, load_catalog  # noqa: E402
from featureplane.stores.embedded import EmbeddedStore  # noqa: E402
from featureplane.stores.redis_cache import RedisCache  # noqa: E402
from tests.services import free_port, start_redis  # noqa: E402

SPEC = """
feature_groups:
  - {name: last, entity: user, kind: latest, tiers: [local, redis, store],
     ttl: {soft: 30s, hard: 5m, jitter: 0.1},
     features: [{name: article_id, type: string}, {name: seq, type: int}]}
  - {name: last_nolocal, entity: user, kind: latest, tiers: [redis, store],
     ttl: {soft: 30s, hard: 5m, jitter: 0.1},
     features: [{name: article_id, type: string}, {name: seq, type: int}]}
"""
LUA = """
local n = %d
request = function()
  return wrk.format("GET", "/v1/features/last/" .. math.random(0, n - 1))
end
"""
CUT_S = 2.0  # a probe gives up after this long (without invalidation: up to the soft TTL)
MODES = {
    "off": {"FEATUREPLANE_SERVE_INVALIDATION": "off"},
    "drop": {"FEATUREPLANE_SERVE_INVALIDATION": "drop"},
    "refresh": {"FEATUREPLANE_SERVE_INVALIDATION": "refresh"},
    "drop+long": {"FEATUREPLANE_SERVE_INVALIDATION": "drop", "LONG": "1"},
    "refresh+long": {"FEATUREPLANE_SERVE_INVALIDATION": "refresh", "LONG": "1"},
}


@dataclass
class Probes:
    """Seconds from a write's return to the new value served, one per probed batch."""

    took: list[float] = field(default_factory=list)
    cut: int = 0  # probes not served the new value within CUT_S

    def pct(self, q: float) -> float | None:
        if not self.took or len(self.took) < (self.cut + len(self.took)) * q:
            return None  # the quantile is past the cut
        ranked = sorted(self.took)
        return ranked[min(len(ranked) - 1, int(q * (len(self.took) + self.cut)))]


def _item(catalog: Catalog, group: str, uid: int, seq: int) -> Item:
    return make_item(
        catalog.group(group),
        str(uid),
        time.time_ns() // 1_000_000,
        f"e{seq}",
        {"article_id": f"a{seq}", "seq": seq},
    )


async def _seed(catalog: Catalog, data: Path, url: str, ids: int) -> None:
    async with Writer(
        catalog, EmbeddedStore(catalog, data), RedisCache(catalog, url), policy=RetryInPlace()
    ) as w:
        await w.write_items([_item(catalog, "last", i, 0) for i in range(ids)])


async def _warm(port: int, ids: int) -> None:
    async with aiohttp.ClientSession() as s:
        for lo in range(0, ids, 1000):
            body = {"requests": [{"group": "last", "ids": [str(i) for i in range(lo, lo + 1000)]}]}
            async with s.post(f"http://127.0.0.1:{port}/v1/features", json=body) as r:
                assert r.status == 200, await r.text()


def _local_counts(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "featureplane_cache_events_total" and s.labels.get("tier") == "local":
                if s.labels.get("group") == "last":
                    out[s.labels["event"]] = s.value
    return out


async def _write_and_probe(
    catalog: Catalog, data: Path, url: str, port: int, ids: int, rate: int, duration: float
) -> Probes:
    probes = Probes()
    rng = random.Random(7)
    per_batch = max(1, rate // 10)
    seq = 1_000_000  # above anything seeded

    async def probe(s: aiohttp.ClientSession, uid: int, want: int, since: float) -> None:
        path = f"http://127.0.0.1:{port}/v1/features/last/{uid}"
        while time.monotonic() - since < CUT_S:
            async with s.get(path) as r:
                doc = await r.json()
            if doc.get("found") and doc["features"]["seq"] >= want:
                probes.took.append(time.monotonic() - since)
                return
            await asyncio.sleep(0.002)
        probes.cut += 1

    async with (
        Writer(
            catalog, EmbeddedStore(catalog, data), RedisCache(catalog, url), policy=RetryInPlace()
        ) as w,
        aiohttp.ClientSession() as s,
    ):
        tasks: list[asyncio.Task[None]] = []
        end = time.monotonic() + duration
        tick = time.monotonic()
        while time.monotonic() < end:
            # distinct ids: two items of one id in one millisecond tie on ts, and the
            # newest wins by version then, not by seq
            batch = rng.sample(range(ids), per_batch)
            items = []
            for uid in batch:
                seq += 1
                items.append(_item(catalog, "last", uid, seq))
            await w.write_items(items)
            done = time.monotonic()
            tasks.append(asyncio.create_task(probe(s, batch[-1], seq, done)))
            tick += 0.1
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
        await asyncio.gather(*tasks)
    return probes


def _serve(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "featureplane.cli", "serve", "--port", str(port)]
    return subprocess.Popen(argv, env={**os.environ, **env}, cwd=REPO)


def _wrk(port: int, lua: Path, duration: float, conns: int) -> tuple[float, float]:
    """wrk's requests a second and p99 (ms)."""
    out = subprocess.run(
        [
            *("wrk", "-t1", f"-c{conns}", f"-d{int(duration)}s", "--latency"),
            *("-s", str(lua), f"http://127.0.0.1:{port}"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    v, unit = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)$", out, re.M).groups()  # type: ignore[union-attr]
    return rps, float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


async def _load_cost(catalog: Catalog, data: Path, url: str, n: int) -> dict[str, float]:
    """Seconds to load `n` items into a group with a local tier (published) and into
    one without (not), alternated twice."""
    took: dict[str, list[float]] = {"last": [], "last_nolocal": []}
    for rnd in range(2):
        for group in ("last", "last_nolocal"):
            items = [_item(catalog, group, 100_000 + i, rnd) for i in range(n)]
            async with Writer(
                catalog,
                EmbeddedStore(catalog, data),
                RedisCache(catalog, url),
                policy=RetryInPlace(),
                flow="load",
            ) as w:
                t = time.perf_counter()
                for lo in range(0, n, 50_000):
                    await w.write_items(items[lo : lo + 50_000])
                took[group].append(time.perf_counter() - t)
    return {g: min(v) for g, v in took.items()}


def _run_mode(
    catalog: Catalog,
    tmp: Path,
    url: str,
    env: dict[str, str],
    lua: Path,
    ids: int,
    rate: int,
    duration: float,
    conns: int,
) -> tuple[Probes, dict[str, float], float, float]:
    """One server in one mode, warmed, under wrk and the writer: its probes, the deltas
    of its local tier's counts, wrk's RPS and p99 (ms)."""
    port = free_port()
    proc = _serve(port, env)
    try:
        wait_up(port)
        asyncio.run(_warm(port, ids))
        subprocess.run(  # warm-up of the load itself
            ["wrk", "-t1", f"-c{conns}", "-d2s", "-s", str(lua), f"http://127.0.0.1:{port}"],
            capture_output=True,
            check=True,
        )
        before = _local_counts(port)
        got: list[Probes] = []
        writer = threading.Thread(
            target=lambda: got.append(
                asyncio.run(_write_and_probe(catalog, tmp / "data", url, port, ids, rate, duration))
            )
        )
        writer.start()
        rps, p99 = _wrk(port, lua, duration, conns)
        writer.join()
        after = _local_counts(port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return got[0], {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}, rps, p99


def invalidation_rows(
    duration: float = 15.0,
    ids: int = 10_000,
    rate: int = 1_000,
    modes: tuple[str, ...] = tuple(MODES),
    long_soft: str = "4m",
    load_items: int = 200_000,
    rounds: int = 2,
    conns: int = 32,
) -> list[tuple[str, dict[str, float | None]]]:
    """One row per mode: write -> new value served p50/p99 (ms, None past the 2 s cut), the
    share cut, the local hit rate (%), wrk's RPS (mean of `rounds` runs, the modes taking
    turns); and the load-cost row."""
    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-inval-"))
    (tmp / "spec.yaml").write_text(SPEC)
    catalog = load_catalog(tmp / "spec.yaml")
    redis = start_redis(workdir=tmp / "redis")
    rows: list[tuple[str, dict[str, float | None]]] = []
    try:
        url = f"redis://{redis.address}/0"
        asyncio.run(_seed(catalog, tmp / "data", url, ids))
        lua = tmp / "get.lua"
        lua.write_text(LUA % ids)
        base = {
            "FEATUREPLANE_SPEC": str(tmp / "spec.yaml"),
            "FEATUREPLANE_DATA_DIR": str(tmp / "data"),
            "FEATUREPLANE_REDIS_URL": url,
            "FEATUREPLANE_SERVE_WORKERS": "1",
        }
        probes = {m: Probes() for m in modes}
        counts: dict[str, dict[str, float]] = {m: {} for m in modes}
        rps: dict[str, list[float]] = {m: [] for m in modes}
        p99s: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(rounds):
            for mode in modes:
                env = {**base, **{k: v for k, v in MODES[mode].items() if k != "LONG"}}
                if "LONG" in MODES[mode]:
                    env["FEATUREPLANE_SERVE_LOCAL_SOFT_TTL"] = long_soft
                p, d, r, q = _run_mode(catalog, tmp, url, env, lua, ids, rate, duration, conns)
                probes[mode].took += p.took
                probes[mode].cut += p.cut
                for k, v in d.items():
                    counts[mode][k] = counts[mode].get(k, 0.0) + v
                rps[mode].append(r)
                p99s[mode].append(q)
        for mode in modes:
            d, pr = counts[mode], probes[mode]
            looked = d.get("hit", 0) + d.get("miss", 0) + d.get("unanswerable", 0)
            p50, p99 = pr.pct(0.5), pr.pct(0.99)
            rows.append(
                (
                    mode,
                    {
                        "p50_ms": None if p50 is None else p50 * 1000,
                        "p99_ms": None if p99 is None else p99 * 1000,
                        "cut_pct": 100 * pr.cut / max(1, pr.cut + len(pr.took)),
                        "probes": float(pr.cut + len(pr.took)),
                        "hit_pct": 100 * d.get("hit", 0) / looked if looked else None,
                        "stale_pct": 100 * d.get("stale", 0) / looked if looked else None,
                        "rps": sum(rps[mode]) / len(rps[mode]),
                        "rps_min": min(rps[mode]),
                        "rps_max": max(rps[mode]),
                        "wrk_p99_ms": max(p99s[mode]),
                        "load": os.getloadavg()[0],
                    },
                )
            )
        if load_items:
            cost = asyncio.run(_load_cost(catalog, tmp / "data", url, load_items))
            rows.append(
                (
                    "load",
                    {
                        "published_s": cost["last"],
                        "unpublished_s": cost["last_nolocal"],
                        "items": float(load_items),
                    },
                )
            )
    finally:
        redis.kill()
    return rows


def _fmt(v: float | None, unit: str = "") -> str:
    return f"> {CUT_S * 1000:.0f}" if v is None else f"{v:,.1f}{unit}"


def print_rows(
    rows: list[tuple[str, dict[str, float | None]]],
    rate: int,
    ids: int,
    conns: int,
    duration: float,
    long_soft: str,
    rounds: int,
) -> None:
    print(
        f"\n{rate} writes/s over {ids} ids (a batch / 100 ms) while wrk -t1 "
        f"-c{conns} reads them, {duration:.0f} s a mode, soft 30s / hard 5m, "
        f"long soft {long_soft}, {os.cpu_count()} cores, {rounds} rounds "
        "(RPS: mean, min-max; wrk p99: the worst round's)"
    )
    print(
        f"{'mode':<14} {'write->served p50':>18} {'p99 ms':>8} {'cut':>6} "
        f"{'local hit':>10} {'stale':>6} {'RPS':>9} {'min-max':>13} {'wrk p99':>8} {'load':>5}"
    )
    for name, r in rows:
        if name == "load":
            pub, unpub = r["published_s"], r["unpublished_s"]
            assert pub is not None and unpub is not None
            print(
                f"load of {r['items']:,.0f} items through the Writer: published {pub:.2f} s, "
                f"not published {unpub:.2f} s ({100 * (pub / unpub - 1):+.1f}%)"
            )
            continue
        print(
            f"{name:<14} {_fmt(r['p50_ms']):>18} {_fmt(r['p99_ms']):>8} "
            f"{r['cut_pct'] or 0:5.1f}% {_fmt(r['hit_pct'], '%'):>10} "
            f"{_fmt(r['stale_pct'], '%'):>6} {r['rps'] or 0:9,.0f} "
            f"{r['rps_min'] or 0:6,.0f}-{r['rps_max'] or 0:<6,.0f} {r['wrk_p99_ms'] or 0:8.1f} "
            f"{r['load'] or 0:5.2f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per mode")
    ap.add_argument("--ids", type=int, default=10_000, help="distinct ids read and written")
    ap.add_argument("--rate", type=int, default=1_000, help="items written a second")
    ap.add_argument("--only", default=",".join(MODES), help="modes, comma-separated")
    ap.add_argument("--long-soft", default="4m", help="the long local soft TTL")
    ap.add_argument("--load-items", type=int, default=200_000, help="0 skips the load row")
    ap.add_argument("--rounds", type=int, default=2, help="runs of every mode, taking turns")
    ap.add_argument("--connections", type=int, default=32, help="wrk's connections")
    args = ap.parse_args()
    rows = invalidation_rows(
        args.duration,
        args.ids,
        args.rate,
        tuple(args.only.split(",")),
        args.long_soft,
        args.load_items,
        args.rounds,
        args.connections,
    )
    print_rows(
        rows, args.rate, args.ids, args.connections, args.duration, args.long_soft, args.rounds
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

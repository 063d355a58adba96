"""Benchmark of `featureplane serve` against a bare aiohttp ceiling.

    python bench/serve.py [--duration 20] [--ids 100000] [--profile] [--uvloop]

Load: wrk (`apt-get install -y wrk`) in its own process, one thread, 32 connections,
POST bodies from a Lua script with a random id of `--ids` per request, after a warm-up.
Scenarios:
  (a) one latest group, one id, from the local tier (warmed: every id cached);
  (b) three groups (one timeseries of 30 items) for one id from Redis, local tier off,
      twice: on one redis-server, and on a Redis Cluster of 3 masters on this machine
      (FEATUREPLANE_REDIS_CLUSTER=true: one script call per hash slot, sent per node);
  (c) the same from the embedded store (a server without Redis, local tier off).
Ceiling: a bare aiohttp handler in its own process returning a fixed JSON body of the
scenario's response size, measured in the same run. Servers and ceiling run on asyncio's
loop, or all on uvloop with `--uvloop` (serve's default), so a row compares like with
like. `--profile` samples the server with py-spy during each scenario and prints its
hottest functions.

Fairness: wrk, redis-server and the server share the machine's cores, and so does
anything else running (another bench, a test run). Each row prints the 1-minute load
average at its end, and the CPU the server process used over its run: a busy machine
shows as load > ~2 on 2 cores or a server well below 100%. `CPU/req` (server CPU time per
answer, in us) and `cpu ceil/us` (the ceiling's CPU per answer over ours) move far less
with the machine's load than RPS does: compare those when the machine is shared.
Pinning (server on core 0, wrk and Redis on core 1, the ceiling pinned the same) was
measured and left out: with another process on the machine it lowered both the ceiling
and (a) (23.8k -> 18.1k, 14.6k -> 12.2k), since a pinned process cannot move off a core
that something else is using.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import invalidation, serve_workers, vectors  # noqa: E402
from bench.serve_kit import BODY_A, BODY_B, CEILING, LUA, SPEC, response_size, wait_up  # noqa: E402
from featureplane.cache import CacheFill  # noqa: E402
from featureplane.codec import Record, make_item  # noqa: E402
from featureplane.spec import load_catalog  # noqa: E402
from featureplane.stores.embedded import EmbeddedStore  # noqa: E402
from featureplane.stores.redis_cache import RedisCache  # noqa: E402
from tests.services import free_port, start_redis, start_redis_cluster  # noqa: E402


async def load_data(catalog: Any, data_dir: Path, redis_url: str, cluster_url: str, n: int) -> None:
    now = int(time.time() * 1000)
    groups = {g: catalog.group(g) for g in ("last_click", "keywords", "stats", "recent")}
    async with (
        EmbeddedStore(catalog, data_dir) as store,
        RedisCache(catalog, redis_url) as redis,
        RedisCache(catalog, cluster_url, cluster=True) as cluster,
    ):
        step = 2_000
        for lo in range(0, n, step):
            items, fills = [], []
            for i in range(lo, min(lo + step, n)):
                uid = str(i)
                one = [
                    make_item(
                        groups["last_click"],
                        uid,
                        now,
                        f"c{i}",
                        {"article_id": f"a{i}", "category": "bike"},
                    ),
                    make_item(
                        groups["keywords"],
                        uid,
                        now,
                        f"k{i}",
                        {"keywords": {"bike", "desk", f"k{i % 97}"}, "updated_by": "app"},
                    ),
                    make_item(groups["stats"], uid, now, f"s{i}", {"clicks": i, "score": i / 7}),
                ]
                recent = [
                    make_item(
                        groups["recent"],
                        uid,
                        now - j * 1000,
                        f"r{i}-{j}",
                        {"article_id": f"a{(i + j) % 5000}", "category": "bike"},
                    )
                    for j in range(30)
                ]
                items += one + recent
                for it in one[1:]:
                    fills.append(CacheFill(it.group, uid, [Record(it.ts, it.version, it.value)]))
                fills.append(
                    CacheFill("recent", uid, [Record(r.ts, r.version, r.value) for r in recent])
                )
            await store.write(items)
            await redis.fill(fills)
            await cluster.fill(fills)


def serve(port: int, env: dict[str, str], uvloop: bool) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "featureplane.cli", "serve", "--port", str(port)]
    # One server process, as the ceiling is one: `--workers` rows are the workers bench's.
    # The loop said, as the ceiling's is: `serve` runs on uvloop unless told otherwise.
    own = {"FEATUREPLANE_SERVE_WORKERS": "1", "FEATUREPLANE_SERVE_UVLOOP": str(uvloop).lower()}
    return subprocess.Popen(argv, env={**os.environ, **own, **env}, cwd=REPO)


async def warm_local(port: int, n: int) -> None:
    async with aiohttp.ClientSession() as s:
        for lo in range(0, n, 1000):
            ids = [str(i) for i in range(lo, min(lo + 1000, n))]
            async with s.post(
                f"http://127.0.0.1:{port}/v1/features",
                json={"requests": [{"group": "last_click", "ids": ids}]},
            ) as r:
                assert r.status == 200, await r.text()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(
    port: int, lua: Path, duration: float, pid: int | None, profile: Path | None
) -> dict[str, float]:
    subprocess.run(
        ["wrk", "-t1", "-c32", "-d3s", "-s", str(lua), f"http://127.0.0.1:{port}"],
        capture_output=True,
        check=True,
    )  # warm-up
    spy = None
    if profile is not None and pid is not None:
        spy = subprocess.Popen(
            [
                "py-spy",
                "record",
                "-p",
                str(pid),
                "-d",
                str(int(duration)),
                "-f",
                "raw",
                "-o",
                str(profile),
                "-r",
                "200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    cpu0 = _cpu_seconds(pid) if pid else 0.0
    t0 = time.monotonic()
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            "-c32",
            f"-d{int(duration)}s",
            "--latency",
            "-s",
            str(lua),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    used = _cpu_seconds(pid) - cpu0 if pid else 0.0
    cpu = used / (time.monotonic() - t0)
    if spy is not None:
        spy.wait(timeout=60)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {
        p: float(v) * _UNITS[u]
        for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)
    }
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    answered = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {
        "rps": rps,
        "p50": lat["50"],
        "p99": lat["99"],
        "non2xx": float(errors.group(1)) if errors else 0.0,
        "cpu": cpu,
        "cpu_us": 1e6 * used / max(answered, 1),
        "load": os.getloadavg()[0],
    }


def hottest(profile: Path, top: int = 8) -> list[str]:
    """Self time by function from py-spy's collapsed stacks."""
    if not profile.exists():
        return ["(no profile: is py-spy installed and allowed to ptrace?)"]
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        own[re.sub(r"\s*\(.*/", " (", leaf)] += int(count)
        total += int(count)
    return [f"{100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    ap.add_argument("--ids", type=int, default=100_000, help="distinct entity ids")
    ap.add_argument("--profile", action="store_true", help="py-spy the server per scenario")
    ap.add_argument(
        "--uvloop", action="store_true", help="run the servers and the ceiling on uvloop"
    )
    ap.add_argument(
        "--only",
        default="abcwiv",
        help="what to run: a, b, c (the scenarios), w (1 vs 2 workers), "
        "i (invalidation of the local tier), v (vector encoding); e.g. ab",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-serve-"))
    (tmp / "spec.yaml").write_text(SPEC)
    catalog = load_catalog(tmp / "spec.yaml")
    redis = start_redis(workdir=tmp / "redis")
    cluster = start_redis_cluster()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        url = f"redis://{redis.address}/0"
        t = time.time()
        asyncio.run(load_data(catalog, tmp / "data", url, cluster.url, args.ids))
        print(
            f"loaded {args.ids} ids x (3 latest + 30 timeseries items) in {time.time() - t:.0f} s",
            file=sys.stderr,
        )
        env = {
            "FEATUREPLANE_SPEC": str(tmp / "spec.yaml"),
            "FEATUREPLANE_DATA_DIR": str(tmp / "data"),
            "FEATUREPLANE_REDIS_URL": url,
        }
        with_redis, without = free_port(), free_port()
        procs.append(serve(with_redis, env, args.uvloop))
        no_redis_env = {k: v for k, v in env.items() if k != "FEATUREPLANE_REDIS_URL"}
        procs.append(
            serve(without, {**no_redis_env, "FEATUREPLANE_SERVE_LOCAL_CACHE_MB": "0"}, args.uvloop)
        )
        with_cluster = free_port()
        cluster_env = {"FEATUREPLANE_REDIS_URL": cluster.url, "FEATUREPLANE_REDIS_CLUSTER": "true"}
        procs.append(serve(with_cluster, {**env, **cluster_env}, args.uvloop))
        wait_up(with_redis)
        wait_up(without)
        wait_up(with_cluster)
        asyncio.run(warm_local(with_redis, args.ids))
        scenarios = {
            "a": [("(a) 1 latest group, local tier", with_redis, BODY_A)],
            "b": [
                ("(b) 3 groups incl. 30-item timeseries, Redis", with_redis, BODY_B),
                ("(b) the same, Redis Cluster of 3 masters", with_cluster, BODY_B),
            ],
            "c": [("(c) 3 groups incl. 30-item timeseries, store", without, BODY_B)],
        }
        pids = {with_redis: procs[0].pid, without: procs[1].pid, with_cluster: procs[2].pid}
        rows = []
        ceilings: dict[int, dict[str, float]] = {}
        for key, title, port, body in (
            (k, *row) for k in args.only if k in scenarios for row in scenarios[k]
        ):
            sample = response_size(port, body % ((7,) * body.count("%d")))
            size = len(sample)
            lua = tmp / f"{key}.lua"
            lua.write_text(LUA % (args.ids, body))
            if size not in ceilings:
                (tmp / "fixed.json").write_bytes(sample)
                cport = free_port()
                cargv = [sys.executable, "-c", CEILING, str(cport), str(tmp / "fixed.json")]
                if args.uvloop:
                    cargv = [
                        sys.executable,
                        "-c",
                        "import uvloop; uvloop.install()\n" + CEILING,
                        str(cport),
                        str(tmp / "fixed.json"),
                    ]
                ceiling = subprocess.Popen(cargv)
                wait_up(cport, "/")
                ceilings[size] = wrk(cport, lua, args.duration, ceiling.pid, None)
                ceiling.terminate()
                ceiling.wait()
                rows.append((f"ceiling: bare aiohttp, {size} B", ceilings[size], None))
            prof = tmp / f"{key}{port}.prof" if args.profile else None
            res = wrk(port, lua, args.duration, pids[port], prof)
            rows.append((f"{title}, {size} B", res, ceilings[size]))
            if prof is not None:
                print(f"\n{title}: hottest functions (self time)", file=sys.stderr)
                for line in hottest(prof):
                    print("   ", line, file=sys.stderr)
        print(
            f"\nwrk -t1 -c32, {args.duration:.0f} s after a 3 s warm-up, {args.ids} ids, "
            f"{'uvloop' if args.uvloop else 'asyncio'} loop, {os.cpu_count()} cores"
        )
        print(
            f"{'scenario':58} {'RPS':>8} {'p50 ms':>7} {'p99 ms':>7} {'RPS/ceil':>8} "
            f"{'non-2xx':>7} {'srv CPU':>7} {'CPU/req':>7} {'cpu ceil/us':>11} {'load':>5}"
        )
        for name, r, c in rows:
            ratio = f"{r['rps'] / c['rps']:.0%}" if c else "-"
            per = f"{c['cpu_us'] / r['cpu_us']:.0%}" if c else "-"
            print(
                f"{name:58} {r['rps']:8.0f} {r['p50']:7.2f} {r['p99']:7.2f} {ratio:>8} "
                f"{r['non2xx']:7.0f} {r['cpu']:7.0%} {r['cpu_us']:7.0f} {per:>11} {r['load']:5.2f}"
            )
        print(json.dumps({n: r for n, r, _ in rows}), file=sys.stderr)
        for port in (with_redis, without, with_cluster):
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            for line in text.splitlines():
                if line.startswith(("featureplane_cache_events_total", "featureplane_tier_err")):
                    print(f"  :{port} {line}", file=sys.stderr)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=20)
        redis.cleanup()
        cluster.cleanup()
    if "w" in args.only:
        rows = serve_workers.workers_rows(args.duration, min(args.ids, 10_000))
        serve_workers.print_rows(rows, args.duration, 2, 64)
    if "i" in args.only:
        inval = invalidation.invalidation_rows(args.duration, 10_000, rounds=1)
        invalidation.print_rows(inval, 1_000, 10_000, 32, args.duration, "4m", 1)
    if "v" in args.only:
        vectors.print_rows("item encoding of a 768-d vector + 3 scalars", vectors.vector_rows())
    return 0


if __name__ == "__main__":
    sys.exit(main())

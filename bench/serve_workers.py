"""Benchmark of `featureplane serve --workers N`: 1 vs 2 workers against a 2-process ceiling.

    python bench/serve_workers.py [--duration 10] [--ids 10000] [--threads 2] [--connections 64]

Scenario (a) of bench/serve.py: one latest group, one id a request, from the local tier
(every id warmed in every worker's own local tier), the embedded store behind it.
Rows, each measured in this run with the same wrk load:
  ceiling: bare aiohttp, 1 process, and 2 processes sharing the port (SO_REUSEPORT),
  each answering a fixed JSON body of the scenario's response size;
  serve --workers 1 and --workers 2.
RPS/ceil is against the 2-process ceiling: what 2 cores can do with aiohttp at all.

Load: wrk with 2 threads and 64 connections by default (32 a worker, as bench/serve.py
gives its one process), since one wrk thread cannot load two server processes on its
own; wrk shares the machine's cores with the servers, as it does in bench/serve.py, so
on 2 cores neither the ceiling nor the server gets 2 whole cores. `srv CPU` is the CPU
of the server's processes (supervisor and workers) over the run. `workers_rows` returns
rows shaped like bench/serve.py's (name, result, ceiling) for its table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serve_kit import BODY_A, CEILING, LUA, SPEC, response_size, wait_up  # noqa: E402
from featureplane.codec import make_item  # noqa: E402
from featureplane.spec import Catalog, load_catalog  # noqa: E402
from featureplane.stores.embedded import EmbeddedStore  # noqa: E402
from tests.services import free_port  # noqa: E402

Result = dict[str, float]
Row = tuple[str, Result, Result | None]

# The ceiling of bench/serve.py, its processes sharing the port as the workers do.
CEILING_SHARED = CEILING.replace("access_log=None", "reuse_port=True, access_log=None")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


async def _load(catalog: Catalog, data_dir: Path, n: int) -> None:
    group = catalog.group("last_click")
    now = int(time.time() * 1000)
    async with EmbeddedStore(catalog, data_dir) as store:
        for lo in range(0, n, 2_000):
            await store.write(
                [
                    make_item(group, str(i), now, f"c{i}", {"article_id": f"a{i}", "category": "b"})
                    for i in range(lo, min(lo + 2_000, n))
                ]
            )


async def _warm(port: int, n: int, copies: int = 12) -> None:
    """Every id into every worker's local tier: each batch is sent `copies` times, each on a
    new connection (SO_REUSEPORT picks a worker per connection: one missed is 2**-12)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for lo in range(0, n, 1000):
            body = {
                "requests": [
                    {"group": "last_click", "ids": [str(i) for i in range(lo, min(lo + 1000, n))]}
                ]
            }
            for _ in range(copies):
                async with s.post(f"http://127.0.0.1:{port}/v1/features", json=body) as r:
                    assert r.status == 200, await r.text()


def _tree_cpu(roots: set[int]) -> float:
    """CPU seconds of the `roots` and their children (a supervisor and its workers)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) in roots or int(fields[1]) in roots:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _wrk(port: int, lua: Path, duration: float, threads: int, conns: int, pids: set[int]) -> Result:
    base = ["wrk", f"-t{threads}", f"-c{conns}", "-s", str(lua), f"http://127.0.0.1:{port}"]
    subprocess.run([*base[:3], "-d3s", *base[3:]], capture_output=True, check=True)  # warm-up
    cpu0, t0 = _tree_cpu(pids), time.monotonic()
    out = subprocess.run(
        [*base[:3], f"-d{int(duration)}s", "--latency", *base[3:]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = (_tree_cpu(pids) - cpu0) / (time.monotonic() - t0)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {
        p: float(v) * _UNITS[u]
        for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)
    }
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50": lat["50"],
        "p99": lat["99"],
        "non2xx": float(errors.group(1)) if errors else 0.0,
        "cpu": cpu,
        "load": os.getloadavg()[0],
    }


def _ceiling(body: Path, processes: int) -> tuple[int, list[subprocess.Popen[bytes]]]:
    port = free_port()
    script = CEILING_SHARED if processes > 1 else CEILING
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(port), str(body)])
        for _ in range(processes)
    ]
    wait_up(port, "/")
    time.sleep(0.5)  # the last of them listening too (wait_up saw the first)
    return port, procs


def workers_rows(
    duration: float = 10.0,
    ids: int = 10_000,
    threads: int = 2,
    connections: int = 64,
    workdir: Path | None = None,
) -> list[Row]:
    """The rows: ceilings of 1 and 2 processes, serve with 1 and 2 workers (ratio to the
    2-process ceiling), measured now, each after a 3 s warm-up of the same load."""
    tmp = workdir or Path(tempfile.mkdtemp(prefix="fp-bench-workers-"))
    (tmp / "spec.yaml").write_text(SPEC)
    asyncio.run(_load(load_catalog(tmp / "spec.yaml"), tmp / "data", ids))
    lua = tmp / "a.lua"
    lua.write_text(LUA % (ids, BODY_A))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FEATUREPLANE_")},
        "FEATUREPLANE_SPEC": str(tmp / "spec.yaml"),
        "FEATUREPLANE_DATA_DIR": str(tmp / "data"),
    }
    rows: list[Row] = []
    servers: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
    try:
        for count in (1, 2):
            port = free_port()
            argv = [sys.executable, "-m", "featureplane.cli", "serve", "--port", str(port)]
            proc = subprocess.Popen([*argv, "--workers", str(count)], env=env, cwd=tmp)
            servers[count] = (port, proc)
        for port, _ in servers.values():
            wait_up(port, "/readyz")
            asyncio.run(_warm(port, ids))
        sample = response_size(servers[1][0], BODY_A % 7)
        (tmp / "fixed.json").write_bytes(sample)
        size = len(sample)
        ceilings: dict[int, Result] = {}
        for processes in (1, 2):
            cport, procs = _ceiling(tmp / "fixed.json", processes)
            try:
                pids = {p.pid for p in procs}
                ceilings[processes] = _wrk(cport, lua, duration, threads, connections, pids)
            finally:
                for p in procs:
                    p.terminate()
                    p.wait()
            what = "1 process" if processes == 1 else "2 processes, SO_REUSEPORT"
            rows.append((f"ceiling: bare aiohttp, {what}, {size} B", ceilings[processes], None))
        for count, (port, proc) in servers.items():
            res = _wrk(port, lua, duration, threads, connections, {proc.pid})
            name = f"(a) local tier, serve --workers {count}, {size} B"
            rows.append((name, res, ceilings[2]))
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    return rows


def print_rows(rows: list[Row], duration: float, threads: int, connections: int) -> None:
    print(
        f"\nwrk -t{threads} -c{connections}, {duration:.0f} s after a 3 s warm-up, "
        f"{os.cpu_count()} cores; RPS/ceil against the 2-process ceiling"
    )
    print(
        f"{'scenario':58} {'RPS':>8} {'p50 ms':>7} {'p99 ms':>7} {'RPS/ceil':>8} "
        f"{'non-2xx':>7} {'srv CPU':>7} {'load':>5}"
    )
    for name, r, c in rows:
        ratio = f"{r['rps'] / c['rps']:.0%}" if c else "-"
        print(
            f"{name:58} {r['rps']:8.0f} {r['p50']:7.2f} {r['p99']:7.2f} {ratio:>8} "
            f"{r['non2xx']:7.0f} {r['cpu']:7.0%} {r['load']:5.2f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--ids", type=int, default=10_000, help="distinct entity ids")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections")
    args = ap.parse_args()
    rows = workers_rows(args.duration, args.ids, args.threads, args.connections)
    print_rows(rows, args.duration, args.threads, args.connections)
    return 0


if __name__ == "__main__":
    sys.exit(main())

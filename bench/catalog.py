"""How fast the catalog's pages answer with 200 feature groups (issue 13: a group's page in
under 300 ms).

    python bench/catalog.py [--groups 200] [--requests 200]

A spec of N groups, each fed by a rule of one of 10 topics, and 5 batch jobs; one
`featureplane serve` on it (embedded store, one worker), whose catalog reads its own
metrics and a metrics page that does not answer (the worst a page may meet). Each page
is asked --requests times, one at a time, after a warm-up; /healthz on the same server is
the floor (what any answer of this server costs). Prints p50, p99 and max per page.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serve_kit import wait_up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spec(groups: int) -> str:
    lines = ["feature_groups:"]
    for i in range(groups):
        lines.append(
            f"  - {{name: group_{i:03d}, entity: {'user' if i % 2 else 'article'}, "
            f"kind: {'timeseries' if i % 3 == 0 else 'latest'}, owner: team-{i % 9}, "
            f"tags: [t{i % 7}, area{i % 4}], description: 'Group {i}, made for the bench.', "
            f"features: [{{name: a, type: string, description: first}}, "
            f"{{name: b, type: int}}, {{name: c, type: 'list<float>'}}]}}"
        )
    lines.append("ingestion:")
    for i in range(groups):
        lines.append(
            f"  - {{name: rule_{i:03d}, topic: topic-{i % 10}, event_type: e{i % 4}, "
            f"group: group_{i:03d}, id: user_id, features: {{a: x, b: y}}}}"
        )
    lines.append("batch_jobs:")
    for j in range(5):
        lines.append(
            f"  - {{name: job_{j}, backfill: {{topic: topic-{j}, from: -1d}}, "
            f"schedule: '{j} 3 * * *'}}"
        )
    return "\n".join(lines) + "\n"


def timed(url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fp-bench-catalog-"))
    (work / "spec.yaml").write_text(spec(args.groups))
    port = free_port()
    env = {
        **os.environ,
        "FEATUREPLANE_SPEC": str(work / "spec.yaml"),
        "FEATUREPLANE_DATA_DIR": str(work / "data"),
        "FEATUREPLANE_PORT": str(port),
        "FEATUREPLANE_SERVE_WORKERS": "1",
        "FEATUREPLANE_SERVE_CATALOG_METRICS": f"http://127.0.0.1:{free_port()}/metrics",
    }
    env.pop("FEATUREPLANE_TOKEN", None)
    env.pop("FEATUREPLANE_KAFKA_BOOTSTRAP", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "featureplane.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_up(port)
        base = f"http://127.0.0.1:{port}"
        pages = {
            "/healthz (floor)": "/healthz",
            "group page (part)": "/ui/part/groups/group_100",
            "group page (shell + part)": "/ui/groups/group_100",
            "groups list, 200 rows (part)": "/ui/part/groups",
            "topics (part)": "/ui/part/topics",
            "batch jobs (part)": "/ui/part/jobs",
        }
        print(f"catalog of {args.groups} groups, {args.requests} requests a page, one at a time")
        print(f"{'page':32} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for name, path in pages.items():
            timed(base + path, 5)  # warm-up: templates compiled, first scrape done
            ms = sorted(timed(base + path, args.requests))
            p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
            print(f"{name:32} {statistics.median(ms):8.2f} {p99:8.2f} {ms[-1]:8.2f}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()

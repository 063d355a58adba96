"""Run the whole platform on this machine on embedded defaults.

Starts, supervises and stops together: the embedded Kafka-compatible broker
(tansu; skipped when FEATUREPLANE_KAFKA_BOOTSTRAP or --bootstrap names one),
the ingest and retry dataflows, and the HTTP server, all on the embedded
store in --data-dir (plus the Redis tier when FEATUREPLANE_REDIS_URL is set).
It creates the topics the spec needs, waits until every part is ready,
prints what runs where, restarts a part that dies (at most 3 times a
minute, else it exits non-zero with the reason) and stops everything on
Ctrl-C or SIGTERM. With --demo it uses the example catalog and feeds a
steady stream of sample events, so features appear within seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from featureplane.cli import add_kafka_options, add_spec_option, settings_from
from featureplane.services import REPO, Service, free_port, start_tansu
from featureplane.spec import Catalog, load_catalog

__all__ = ["add_arguments", "run"]

log = logging.getLogger("featureplane.up")

EXAMPLES = REPO / "examples"
READY_TIMEOUT_S = 90.0
MAX_RESTARTS, RESTART_WINDOW_S = 3, 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_option(p)
    add_kafka_options(p, group=False)
    p.add_argument(
        "--data-dir", help="embedded store and logs [FEATUREPLANE_DATA_DIR, ./.featureplane]"
    )
    p.add_argument("--host", help="serving address [FEATUREPLANE_HOST, 127.0.0.1]")
    p.add_argument("--port", type=int, help="serving port [FEATUREPLANE_PORT, 8000]")
    p.add_argument(
        "--demo", action="store_true", help="use the example catalog and feed sample events"
    )
    p.add_argument("--rate", type=float, default=50.0, help="demo events per second [50]")


@dataclass
class Child:
    """One supervised process: a featureplane subcommand with its own log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready_url: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: deque[float] = field(default_factory=deque)
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.starts.append(time.monotonic())

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def ready(self) -> bool:
        if self.ready_url is None:
            return self.exited() is None
        try:
            with urllib.request.urlopen(self.ready_url, timeout=1) as resp:  # noqa: S310 (loopback)
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the child's process group; SIGKILL if it has not gone by `timeout`."""
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
                _signal_group(self.proc, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            _signal_group(self.proc, signal.SIGKILL)  # anything it left behind
        if self._log:
            self._log.close()

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run(args: argparse.Namespace) -> int:
    if args.demo and args.spec is None and "FEATUREPLANE_SPEC" not in os.environ:
        args.spec = str(EXAMPLES)
    settings = settings_from(args)
    catalog = load_catalog(settings.spec)
    data_dir = settings.data_dir.resolve()
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)

    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    broker: Service | None = None
    children: list[Child] = []
    try:
        bootstrap = settings.kafka_bootstrap
        if not bootstrap:
            broker = start_tansu(workdir=data_dir / "broker")
            broker.own_dir = False
            bootstrap = broker.address
            log.info("embedded broker (tansu) on %s", bootstrap)
        create_topics(bootstrap, catalog)
        children = plan_children(settings.spec.resolve(), data_dir, bootstrap, args)
        for child in children:
            child.start()
        if not wait_ready(children, lambda: stopping):
            return 0 if stopping else 1
        print(
            banner(
                children, data_dir, bootstrap, broker is not None, settings.redis_url is not None
            )
        )
        sys.stdout.flush()
        return supervise(children, lambda: stopping)
    finally:
        for child in reversed(children):
            child.stop()
        if broker is not None:
            broker.stop()
        log.info("stopped")


def create_topics(bootstrap: str, catalog: Catalog, partitions: int = 4) -> None:
    """Create each spec topic and its .retry and .dlq topics if missing."""
    from operators.kafka import ensure_topics
    from operators.route import dlq_topic, retry_topic

    wanted = [name for t in catalog.topics for name in (t, retry_topic(t), dlq_topic(t))]
    ensure_topics(bootstrap, dict.fromkeys(wanted, partitions))


def plan_children(
    spec: Path, data_dir: Path, bootstrap: str, args: argparse.Namespace
) -> list[Child]:
    env = dict(os.environ)
    env.update(
        FEATUREPLANE_SPEC=str(spec),
        FEATUREPLANE_DATA_DIR=str(data_dir),
        FEATUREPLANE_KAFKA_BOOTSTRAP=bootstrap,
        PYTHONUNBUFFERED="1",
    )
    for name in ("host", "port"):
        if getattr(args, name) is not None:
            env[f"FEATUREPLANE_{name.upper()}"] = str(getattr(args, name))
    host = env.get("FEATUREPLANE_HOST", "127.0.0.1")
    port = env.get("FEATUREPLANE_PORT", "8000")
    exe = [sys.executable, "-m", "featureplane.cli"]
    logs = data_dir / "logs"
    children = []
    for name in ("ingest", "retry"):
        metrics = free_port()
        children.append(
            Child(
                name,
                [*exe, name],
                env | {"FEATUREPLANE_METRICS_PORT": str(metrics)},
                logs / f"{name}.log",
                f"http://127.0.0.1:{metrics}/metrics",
            )
        )
    children.append(
        Child(
            "serve",
            [*exe, "serve"],
            env,
            logs / "serve.log",
            f"http://{_loopback(host)}:{port}/readyz",
        )
    )
    if args.demo:
        demo = [*exe, "demo-events", "--rate", str(args.rate)]
        children.append(Child("demo-events", demo, env, logs / "demo-events.log"))
    return children


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104


def wait_ready(children: list[Child], stopping: object) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = list(children)
    while pending:
        if callable(stopping) and stopping():
            return False
        for child in list(pending):
            code = child.exited()
            if code is not None:
                log.error(
                    "%s exited with %s while starting; its log:\n%s", child.name, code, child.tail()
                )
                return False
            if child.ready():
                log.info("%s is ready", child.name)
                pending.remove(child)
        if time.monotonic() > deadline:
            names = ", ".join(c.name for c in pending)
            log.error("not ready after %.0fs: %s", READY_TIMEOUT_S, names)
            return False
        time.sleep(0.2)
    return True


def supervise(children: list[Child], stopping: object) -> int:
    while not (callable(stopping) and stopping()):
        for child in children:
            code = child.exited()
            if code is None:
                continue
            now = time.monotonic()
            while child.starts and now - child.starts[0] > RESTART_WINDOW_S:
                child.starts.popleft()
            if len(child.starts) >= MAX_RESTARTS:
                log.error(
                    "%s exited with %s, %d times within %.0fs; giving up. Its log:\n%s",
                    child.name,
                    code,
                    len(child.starts),
                    RESTART_WINDOW_S,
                    child.tail(),
                )
                return 1
            log.warning(
                "%s exited with %s; restarting it. Its log:\n%s", child.name, code, child.tail(5)
            )
            child.start()
        time.sleep(0.5)
    return 0


def banner(
    children: list[Child], data_dir: Path, bootstrap: str, embedded: bool, redis: bool
) -> str:
    serve = next(c for c in children if c.name == "serve")
    base = (serve.ready_url or "").removesuffix("/readyz")
    lines = [
        "",
        "featureplane is up",
        f"  HTTP API      {base}   (GET /v1/groups, POST /v1/features, /metrics, /openapi.json)",
        f"  Kafka         {bootstrap}{'   (embedded tansu, in memory)' if embedded else ''}",
        f"  store         embedded, {data_dir / 'features.db'}",
        f"  Redis tier    {'on' if redis else 'off (set FEATUREPLANE_REDIS_URL to add it)'}",
    ]
    for c in children:
        if c.name in ("ingest", "retry"):
            lines.append(f"  {c.name:<13} metrics {c.ready_url}")
    lines += [
        f"  logs          {data_dir / 'logs'}",
        "",
        "try:",
        f"  curl -s {base}/v1/features/recent_user_clicked_fleaMarketArticles/user-1?limit=3",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)

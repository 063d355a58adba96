"""`featureplane up`: the whole platform on this machine, supervised as child processes.

`run` checks what would make the start fail (the HTTP port, a named broker),
starts the embedded broker unless one is named, creates the topics, starts
the ingest, retry and serve commands (and the demo feeder) as children with
their own logs, waits until each is ready, restarts one that dies (at most
`MAX_RESTARTS` a minute) and on SIGTERM or Ctrl-C stops them all: the
dataflows drain for `UpSettings.drain_timeout` and get `STOP_MARGIN_S` more
before they are killed.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO

from pydantic_settings import BaseSettings, SettingsConfigDict

from featureplane.cli.broker import Service, free_port, start_tansu
from featureplane.kafka_config import KafkaConfig
from featureplane.lifecycle import (
    STOP,
    broker_error,
    check_kafka_reachable,
    check_port_free,
    install_stop_handlers,
)
from featureplane.settings import Duration, Settings, format_duration
from featureplane.spec import Catalog, load_catalog, parse_duration

__all__ = [
    "DEMO_GROUP",
    "DRAIN",
    "EXAMPLES",
    "Child",
    "UpSettings",
    "banner",
    "demo_batch",
    "plan_children",
    "run",
    "stop_timeout",
    "wrote_items",
]

log = logging.getLogger("featureplane.cli.up")

EXAMPLES = Path(str(resources.files("featureplane.examples")))
READY_TIMEOUT_S = 90.0
MAX_RESTARTS, RESTART_WINDOW_S = 3, 60.0
DRAIN = "10s"
"""The dataflows' drain timeout under `up` (FEATUREPLANE_DRAIN_TIMEOUT overrides it)."""
STOP_MARGIN_S = 20.0
"""What a dataflow may take after its drain: commit, leave the group, flush, close."""
DEMO_GROUP = "recent_user_clicked_fleaMarketArticles"
"""The example catalog's group whose user-1 items the banner of `up --demo` shows."""


class UpSettings(BaseSettings):
    """What `up` reads from FEATUREPLANE_* variables beyond `Settings`."""

    model_config = SettingsConfigDict(
        env_prefix="FEATUREPLANE_", extra="forbid", frozen=True, use_attribute_docstrings=True
    )

    drain_timeout: Duration = parse_duration(DRAIN)
    """How long the dataflows under `up` wait for records in flight when stopped (shorter
    than a dataflow's own default, so Ctrl-C is quick); passed on to them."""


@dataclass
class Child:
    """One supervised process: a featureplane subcommand with its own log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready_url: str | None = None
    ready_when: Callable[[bytes], bool] | None = None
    """What the ready URL's 200 body must also show (None: the 200 is enough)."""
    cwd: Path | None = None
    once: bool = False
    """Runs to its end, is never restarted, and its end is reported (the demo's batch run)."""
    proc: subprocess.Popen[bytes] | None = None
    starts: deque[float] = field(default_factory=deque)
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
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
                if resp.status != 200:
                    return False
                return self.ready_when is None or self.ready_when(resp.read())
        except OSError:
            return False

    def terminate(self) -> None:
        """SIGTERM to the child's process group: it drains and exits on its own."""
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGTERM)

    def finish(self, deadline: float) -> None:
        """Wait for the child until `deadline` (monotonic), then SIGKILL what is left."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", self.name)
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


def run(settings: Settings, up: UpSettings, demo_rate: float | None = None) -> int:
    """Run everything until SIGTERM or Ctrl-C; 0 after a clean stop, 1 if a part kept dying.

    `demo_rate` (events a second) feeds sample events, on the example catalog unless a
    spec was given.
    """
    if demo_rate is not None and "spec" not in settings.model_fields_set:
        settings = settings.model_copy(update={"spec": EXAMPLES})
    catalog = load_catalog(settings.spec)
    data_dir = settings.data_dir.resolve()
    # Everything that would fail later, checked before anything starts.
    check_port_free(settings.host, settings.port, "the HTTP API", "--port or FEATUREPLANE_PORT")
    if settings.kafka_bootstrap:
        check_kafka_reachable(settings.kafka_bootstrap)
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    install_stop_handlers()  # cli.main did already, before the imports; `run` may be called alone
    stopping = STOP.is_set

    broker: Service | None = None
    children: list[Child] = []
    drain_s = up.drain_timeout / 1000
    try:
        if stopping():
            return 0
        bootstrap = settings.kafka_bootstrap
        if not bootstrap:
            broker = start_tansu(workdir=data_dir / "broker")
            broker.own_dir = False
            bootstrap = broker.address
            log.info("embedded broker (tansu) on %s", bootstrap)
        create_topics(bootstrap, catalog, config=settings.kafka_config)
        children = plan_children(settings, up, bootstrap, demo_rate)
        for child in children:
            if not stopping():
                child.start()
        if not wait_ready(children, stopping):
            return 0 if stopping() else 1
        embedded, redis = broker is not None, settings.redis_url is not None
        demo = demo_rate is not None and DEMO_GROUP in catalog.groups
        print(banner(children, data_dir, bootstrap, embedded, redis, demo=demo))
        sys.stdout.flush()
        if demo and catalog.jobs:
            children.append(demo_batch(children[0].env, data_dir))
            children[-1].start()
        return supervise(children, stopping)
    finally:
        stop_all(children, stop_timeout(drain_s))
        if broker is not None:
            broker.stop()
        log.info("stopped")


def stop_timeout(drain_s: float) -> float:
    """How long a child may take to stop after SIGTERM before it is killed.

    The dataflows wait up to their drain timeout for records in flight, then
    commit and close their clients (the producer's flush alone may take 10 s):
    a stop timeout shorter than that turned every slow drain into a SIGKILL.
    """
    return max(drain_s + STOP_MARGIN_S, 30.0)


def stop_all(children: list[Child], timeout: float) -> None:
    """SIGTERM every child at once (they drain in parallel), then wait for each."""
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in reversed(children):
        child.finish(deadline)


def create_topics(
    bootstrap: str, catalog: Catalog, partitions: int = 4, *, config: KafkaConfig | None = None
) -> None:
    """Create each spec topic and its .retry and .dlq topics if missing; `config` is the
    user's librdkafka properties (FEATUREPLANE_KAFKA_CONFIG)."""
    from confluent_kafka import KafkaException

    from featureplane.operators.kafka_cluster import KafkaCluster, ensure_topics
    from featureplane.operators.route import dlq_topic, retry_topic

    wanted = [name for t in catalog.topics for name in (t, retry_topic(t), dlq_topic(t))]
    kafka = KafkaCluster(bootstrap, config or KafkaConfig())
    try:
        ensure_topics(kafka, dict.fromkeys(wanted, partitions))
    except (KafkaException, TimeoutError) as exc:
        raise broker_error(str(kafka), "create the topics", exc) from None


def plan_children(
    settings: Settings, up: UpSettings, bootstrap: str, demo_rate: float | None = None
) -> list[Child]:
    """The children, each with the environment that carries the settings `up` was given."""
    data_dir = settings.data_dir.resolve()
    env = dict(os.environ)  # the rest (AWS_*, FEATUREPLANE_REDIS_URL...) as the user set it
    env.update(
        FEATUREPLANE_SPEC=str(settings.spec.resolve()),
        FEATUREPLANE_DATA_DIR=str(data_dir),
        FEATUREPLANE_KAFKA_BOOTSTRAP=bootstrap,
        FEATUREPLANE_HOST=settings.host,
        FEATUREPLANE_PORT=str(settings.port),
        PYTHONUNBUFFERED="1",
    )
    # The dataflows' metrics are for this machine only (unless the user chose an address);
    # their drain fits in up's stop timeout.
    metrics_host = "127.0.0.1"
    if "metrics_host" in settings.model_fields_set:
        metrics_host = settings.metrics_host
    flow_env = {
        "FEATUREPLANE_METRICS_HOST": metrics_host,
        "FEATUREPLANE_DRAIN_TIMEOUT": format_duration(up.drain_timeout),
    }
    host, port = settings.host, settings.port
    exe = [sys.executable, "-m", "featureplane.cli"]
    logs = data_dir / "logs"
    children = []
    for name in ("ingest", "retry"):
        metrics = free_port()
        children.append(
            Child(
                name,
                [*exe, name],
                env | flow_env | {"FEATUREPLANE_METRICS_PORT": str(metrics)},
                logs / f"{name}.log",
                f"http://127.0.0.1:{metrics}/metrics",
                # With the demo, "up" means the curl the banner suggests finds something: the
                # consumer group's join alone took 5 s after the metrics answered.
                wrote_items if name == "ingest" and demo_rate is not None else None,
            )
        )
    # One server process unless the user asked for more: on one machine the broker and the
    # ingest and retry dataflows need cores too (ingest is the busiest part of `up`).
    # The catalog (/ui) reads the dataflows' figures from their metrics pages.
    flow_metrics = ",".join(str(c.ready_url) for c in children)
    serve_env = {
        "FEATUREPLANE_SERVE_WORKERS": "1",
        "FEATUREPLANE_SERVE_CATALOG_METRICS": flow_metrics,
    } | env
    children.append(
        Child(
            "serve",
            [*exe, "serve"],
            serve_env,
            logs / "serve.log",
            f"http://{_loopback(host)}:{port}/readyz",
        )
    )
    if demo_rate is not None:
        demo = [*exe, "demo-events", "--rate", str(demo_rate)]
        children.append(Child("demo-events", demo, env, logs / "demo-events.log"))
    return children


def demo_batch(env: dict[str, str], data_dir: Path) -> Child:
    """`featureplane batch run` of the example catalog's jobs, once, on sample files written
    now under `data_dir`/samples (the jobs' relative sources are read from there)."""
    from featureplane.cli.demo import write_samples

    at = int(time.time() * 1000)
    files = write_samples(data_dir, at)
    log.info("demo: wrote %d sample files under %s; running the batch jobs", len(files), data_dir)
    argv = [sys.executable, "-m", "featureplane.cli", "batch", "run", "--at", str(at)]
    return Child("batch run", argv, env, data_dir / "logs" / "batch.log", cwd=data_dir, once=True)


_WRITTEN = re.compile(rb"^featureplane_ingest_items_written_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def wrote_items(metrics: bytes) -> bool:
    """Whether an ingest process's Prometheus text counts any item written."""
    return any(float(m.group(1)) > 0 for m in _WRITTEN.finditer(metrics))


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104


def wait_ready(children: list[Child], stopping: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = list(children)
    while pending:
        if stopping():
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


def supervise(children: list[Child], stopping: Callable[[], bool]) -> int:
    while not stopping():
        for child in children:
            code = child.exited()
            if code is None or child.proc is None:
                continue
            if child.once:
                how = "finished" if code == 0 else f"failed (exit status {code})"
                log.info("%s %s; its report:\n%s", child.name, how, child.tail(12))
                child.proc = None
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
    children: list[Child],
    data_dir: Path,
    bootstrap: str,
    embedded: bool,
    redis: bool,
    demo: bool = False,
) -> str:
    serve = next(c for c in children if c.name == "serve")
    base = (serve.ready_url or "").removesuffix("/readyz")
    lines = [
        "",
        "featureplane is up",
        f"  HTTP API      {base}   (GET /v1/groups, POST /v1/features, /metrics, /openapi.json)",
        f"  catalog       {base}/ui   (every feature, its freshness, a lookup box)",
        f"  Kafka         {bootstrap}{'   (embedded tansu, in memory)' if embedded else ''}",
        f"  store         embedded, {data_dir / 'features.db'}",
        f"  Redis tier    {'on' if redis else 'off (set FEATUREPLANE_REDIS_URL to add it)'}",
    ]
    for c in children:
        if c.name in ("ingest", "retry"):
            lines.append(f"  {c.name:<13} metrics {c.ready_url}")
    # Quoted: an unquoted `?` is a glob to zsh, which then refuses the command.
    if demo:  # a group and an id the demo feeds
        tries = [f"  curl -s '{base}/v1/features/{DEMO_GROUP}/user-1?limit=3'"]
    else:  # the user's own catalog: its groups first
        tries = [f"  curl -s '{base}/v1/groups'", f"  curl -s '{base}/v1/features/GROUP/ID'"]
    if demo:
        lines.append(
            f"  batch jobs    run once now on sample files: featureplane batch status "
            f"--data-dir {data_dir}"
        )
    lines += [
        f"  logs          {data_dir / 'logs'}",
        "",
        "try:",
        *tries,
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)

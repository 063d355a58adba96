"""Start the local stand-ins for Redis, DynamoDB and S3 (and the broker) for tests and benches.

Each service gets a free loopback port and its own directory; `stop()` ends
it. `start_redis_cluster` starts a real Redis Cluster of three masters (no
replicas) on loopback. Run `python -m tests.services` to start them by hand.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import redis

from featureplane.cli.broker import (
    REPO,
    Service,
    ServiceError,
    find_binary,
    free_port,
    start_process,
    start_tansu,
)

__all__ = [
    "REPO",
    "RedisClusterService",
    "Service",
    "ServiceError",
    "find_binary",
    "free_port",
    "running",
    "start_dynalite",
    "start_moto",
    "start_redis",
    "start_redis_cluster",
    "start_tansu",
]


class _Stoppable(Protocol):
    def cleanup(self) -> None: ...


S = TypeVar("S", bound=_Stoppable)


@contextmanager
def running(start: Callable[[], S]) -> Iterator[S]:
    """A service for a test, cleaned up after it; a launcher that fails (a missing
    binary, say) fails the test with its message, never skips it."""
    import pytest  # tests only: the benches use the launchers alone

    try:
        svc = start()
    except ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield svc
    finally:
        svc.cleanup()


def start_redis(port: int | None = None, workdir: Path | None = None) -> Service:
    port = port or free_port()
    return start_process("redis", _redis_argv(port), port, workdir, 20)


@dataclass
class RedisClusterService:
    """A running Redis Cluster: one `Service` per master, in slot order."""

    nodes: list[Service]
    workdir: Path

    @property
    def address(self) -> str:
        """One node's address: a cluster client finds the others from it."""
        return self.nodes[0].address

    @property
    def url(self) -> str:
        return f"redis://{self.address}/0"

    def alive(self) -> bool:
        return all(n.alive() for n in self.nodes)

    def cleanup(self) -> None:
        for node in self.nodes:
            node.kill()  # no data to save: SIGKILL ends each at once
        shutil.rmtree(self.workdir, ignore_errors=True)


def _redis_cli() -> str:
    cli = Path(find_binary("redis-server")).with_name("redis-cli")
    found = str(cli) if cli.exists() else shutil.which("redis-cli")
    if found is None:
        raise ServiceError("redis-cli not found; install it with: apt-get install -y redis-tools")
    return found


def start_redis_cluster(
    masters: int = 3, node_timeout_ms: int = 2000, replicas: int = 0
) -> RedisClusterService:
    """`masters` cluster-enabled redis-servers joined by `redis-cli --cluster create`
    (slots split evenly), each with `replicas` replicas, returned once every node says
    `cluster_state:ok`. `nodes` lists the masters first.

    `node_timeout_ms` is how long a silent master takes to be marked failed (then, with
    no replica to promote, the cluster answers CLUSTERDOWN). Each node's bus port is
    picked free too (`--cluster-port`), not the default port + 10000, which may be taken
    or past 65535.
    """
    cli = _redis_cli()  # before anything starts: a missing binary leaves nothing behind
    workdir = Path(tempfile.mkdtemp(prefix="fp-redis-cluster-"))
    cluster = RedisClusterService([], workdir)
    try:
        ports: set[int] = set()
        count = masters * (1 + replicas)
        while len(ports) < 2 * count:
            ports.add(free_port())
        pairs = sorted(ports)
        for port, bus in zip(pairs[:count], pairs[count:], strict=True):
            wd = workdir / str(port)
            argv = [
                *_redis_argv(port),
                *("--cluster-enabled", "yes", "--cluster-config-file", str(wd / "nodes.conf")),
                *("--cluster-node-timeout", str(node_timeout_ms), "--cluster-port", str(bus)),
                # a replica syncs at once and may be promoted whatever its lag: a test kills
                # a master seconds after the start, long before a synced replica would exist
                *("--repl-diskless-sync-delay", "0", "--cluster-replica-validity-factor", "0"),
            ]
            cluster.nodes.append(start_process("redis-cluster", argv, port, wd, 20))
        create = [cli, "--cluster", "create", *(n.address for n in cluster.nodes)]
        done = subprocess.run(
            [*create, "--cluster-replicas", str(replicas), "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise ServiceError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        _wait_cluster_ok(cluster, time.monotonic() + 20)
    except BaseException:
        cluster.cleanup()
        raise
    return cluster


def _wait_cluster_ok(cluster: RedisClusterService, deadline: float) -> None:
    """Until every node says the cluster is ok and every replica has its master's data."""
    pending = list(cluster.nodes)
    while pending:
        node = pending[0]
        with redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=1) as client:
            info = client.cluster("INFO")
            repl = client.info("replication")
        synced = repl["role"] == "master" or repl.get("master_link_status") == "up"
        if info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == 16384 and synced:
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise ServiceError(f"redis cluster node {node.address} not ok: {info}")
        time.sleep(0.05)


def _redis_argv(port: int) -> list[str]:
    return [
        find_binary("redis-server"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]


def start_dynalite(port: int | None = None, workdir: Path | None = None) -> Service:
    port = port or free_port()
    wd = workdir or Path(tempfile.mkdtemp(prefix="fp-dynalite-"))
    argv = [
        find_binary("dynalite"),
        "--port",
        str(port),
        "--path",
        str(wd / "db"),
        "--createTableMs",
        "0",
        "--deleteTableMs",
        "0",
        "--updateTableMs",
        "0",
    ]
    svc = start_process("dynalite", argv, port, wd, 30)
    svc.own_dir = workdir is None
    return svc


def start_moto(port: int | None = None) -> Service:
    """An S3 (and more) API on loopback, for `load s3://...` tests."""
    port = port or free_port()
    argv = [find_binary("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    return start_process("moto", argv, port, None, 30)


def start_pushgateway(port: int | None = None) -> Service:
    """A Prometheus Pushgateway on loopback (Debian's prometheus-pushgateway), in memory."""
    port = port or free_port()
    argv = [
        find_binary("prometheus-pushgateway"),
        f"--web.listen-address=127.0.0.1:{port}",
        "--persistence.file=",
    ]
    return start_process("pushgateway", argv, port, None, 30)


if __name__ == "__main__":  # pragma: no cover - manual helper: python -m tests.services
    services = [start_redis(), start_dynalite(), start_tansu()]
    cluster = start_redis_cluster()
    for s in services:
        print(f"{s.name}: {s.address} (log {s.log})")
    print(f"redis cluster: {cluster.url} (logs under {cluster.workdir})")
    try:
        input("press Enter to stop\n")
    finally:
        for s in services:
            s.cleanup()
        cluster.cleanup()
    sys.exit(0)

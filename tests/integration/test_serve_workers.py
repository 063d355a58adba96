"""`featureplane serve --workers 2`: real processes on one port, one /metrics for all, a
killed worker restarted, SIGTERM stopping every worker with exit 0, start-up errors in one
line."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from featureplane.cli.up import UpSettings, plan_children
from featureplane.errors import StartupError
from featureplane.serving.config import ServeConfig
from featureplane.serving.main import run
from featureplane.settings import Settings
from featureplane.spec import load_catalog
from tests.services import free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
READY = re.compile(r"with 2 workers \(.*; pids (\d+) (\d+)\)")


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.pids: list[int] = []

    def output(self) -> str:
        return self.log.read_text()

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def metric(self, name: str, labels: str) -> float:
        for line in self.get("/metrics")[1].decode().splitlines():
            if line.startswith(f"{name}{{{labels}}} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def _poll(what: str, check: Callable[[], bool], server: Server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout:g}s; output:\n{server.output()[-3000:]}")
        time.sleep(0.05)


def _cli(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREPLANE_")}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "featureplane.cli", "serve", "--spec", str(EXAMPLES), *args],
        env=env,
        cwd=tmp_path,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, log


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    args = ["--data-dir", str(tmp_path / "data"), "--port", str(port)]
    proc, log = _cli(tmp_path, *args, "--workers", "2", "--drain-delay", "0.2")
    s = Server(proc, port, log)
    try:
        _poll("the ready line", lambda: READY.search(s.output()) is not None, s)
        match = READY.search(s.output())
        assert match is not None
        s.pids = [int(match[1]), int(match[2])]
        yield s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _established_on(port: int, pid: int) -> int:
    """How many ESTABLISHED connections to local `port` process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if int(local.split(":")[1], 16) == port and state == "01" and inode in inodes:
            count += 1
    return count


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


HEALTHZ = 'route="/healthz",status="200"'
COUNT = "featureplane_http_request_seconds_count"


def _requests_on_32_connections(server: Server) -> list[http.client.HTTPConnection]:
    conns = []
    for _ in range(32):  # SO_REUSEPORT hashes each connection: all on one worker is 2**-31
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
        conns.append(conn)  # kept open: the worker that holds it can be seen
    return conns


def test_two_workers_share_the_port_and_metrics_survive_a_kill_and_stop_on_sigterm(
    server: Server,
) -> None:
    assert _children(server.proc.pid) == set(server.pids)
    conns = _requests_on_32_connections(server)
    held = {pid: _established_on(server.port, pid) for pid in server.pids}
    for conn in conns:
        conn.close()
    assert all(n > 0 for n in held.values()), held  # both workers answer on the one port
    assert sum(held.values()) == 32
    # Whichever worker answers the scrape counts both workers' requests (the other's
    # within a second).
    _poll("/metrics summing both workers", lambda: server.metric(COUNT, HEALTHZ) == 32, server)

    dead = server.pids[0]
    os.kill(dead, signal.SIGKILL)
    line = re.compile(rf"server worker 0 \(pid {dead}\) was killed by SIGKILL; restarting it in")
    _poll("the restart line", lambda: line.search(server.output()) is not None, server)

    def replaced() -> bool:
        kids = _children(server.proc.pid)
        return len(kids) == 2 and dead not in kids

    _poll("a new worker", replaced, server)
    _poll("the port answering", lambda: server.get("/readyz")[0] == 200, server)
    # The dead worker's requests still count: the sum never goes down on a restart.
    assert server.metric(COUNT, HEALTHZ) == 32

    workers = _children(server.proc.pid)
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 15 s after SIGTERM:\n{server.output()[-3000:]}")
    assert code == 0, server.output()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), server.output()
    assert "Traceback" not in server.output()


def test_a_port_in_use_is_one_error_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(spec=EXAMPLES, data_dir=tmp_path / "data", port=port)
        with pytest.raises(StartupError, match=f"port {port} .* is already in use"):
            run(settings, load_catalog(EXAMPLES), ServeConfig(workers=2))
    assert not (tmp_path / "data").exists()


def test_a_start_up_error_in_the_workers_is_one_line(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")  # the data dir's parent is a file: every worker fails to open it
    proc, log = _cli(tmp_path, "--workers", "2", "--port", "0", "--data-dir", str(blocked / "d"))
    assert proc.wait(timeout=30) == 1
    lines = log.read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featureplane: server worker"), lines


def test_up_runs_one_server_worker_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEATUREPLANE_SERVE_WORKERS", raising=False)
    settings = Settings(spec=tmp_path / "spec", data_dir=tmp_path)

    def serve_env() -> dict[str, str]:
        children = plan_children(settings, UpSettings(), "127.0.0.1:9092")
        return next(c.env for c in children if c.name == "serve")

    assert serve_env()["FEATUREPLANE_SERVE_WORKERS"] == "1"
    monkeypatch.setenv("FEATUREPLANE_SERVE_WORKERS", "3")
    assert serve_env()["FEATUREPLANE_SERVE_WORKERS"] == "3"

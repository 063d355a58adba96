"""Start-up and stop of `featureplane up`, `ingest` and `retry` as an operator meets them:
the real CLI in subprocesses against the real tansu broker.

An early SIGTERM is a clean stop (exit 0); a dead broker, a taken HTTP port or a
taken metrics port is one line naming what to change, found before anything
starts; ingest and retry run side by side on their default metrics ports; in
cluster mode Bytewax's own runner builds the dataflow from its factory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREPLANE_")}
    return env | {"FEATUREPLANE_SPEC": str(EXAMPLES), **extra}


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "featureplane.cli", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """The process's output once it exits; killed (and the test failed) if it does not."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
        pytest.fail(f"still running after {timeout:.0f}s:\n{out[-3000:]}")


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler installed (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & SIGTERM_BIT)


def _closed_port() -> int:
    """A loopback port nobody listens on."""
    return free_port()


@pytest.fixture
def listener() -> Iterator[int]:
    """A port some other program already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if text in cmd or text in cwd:
                found.append(int(entry.name))
    return found


# ---------------------------------------------------------------- early SIGTERM


def test_sigterm_during_start_up_is_a_clean_stop(tmp_path: Path, kafka_bootstrap: str) -> None:
    env = _env(
        FEATUREPLANE_KAFKA_BOOTSTRAP=kafka_bootstrap,
        FEATUREPLANE_KAFKA_GROUP=f"early-{uuid.uuid4().hex[:8]}",
        FEATUREPLANE_METRICS_PORT="0",
        FEATUREPLANE_DATA_DIR=str(tmp_path / "data"),
    )
    installed_after: list[float] = []
    # 0: the moment the handler is in; 0.4 s: imports; 1.0 s: imports or topic creation.
    for delay in (0.0, 0.4, 1.0):
        started = time.monotonic()
        proc = _cli("ingest", env=env, cwd=tmp_path)
        while not _catches_sigterm(proc.pid):
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.005)
        installed_after.append(time.monotonic() - started)
        time.sleep(max(0.0, started + delay - time.monotonic()))
        proc.send_signal(signal.SIGTERM)
        out = _finish(proc)
        assert proc.returncode == 0, f"SIGTERM {delay}s after start: exit {proc.returncode}\n{out}"
        assert "Traceback" not in out, out
    # Before the fix the handlers came after ~1.5 s of imports (and Bytewax's own).
    assert min(installed_after) < 0.6, installed_after

    proc = _cli(
        "up",
        "--data-dir",
        str(tmp_path / "up"),
        "--port",
        str(free_port()),
        env=_env(),
        cwd=tmp_path,
    )
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert proc.returncode == 0, out
    assert not _processes_mentioning(str(tmp_path / "up")), "up left processes behind"


def _one_line_error(proc: subprocess.Popen[str]) -> str:
    """The whole output of a CLI that must fail with exactly one line, no traceback."""
    out = _finish(proc)
    assert proc.returncode not in (0, None), out
    assert "Traceback" not in out, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return lines[0]


# ---------------------------------------------------------------- dead broker


@pytest.mark.parametrize("command", ["up", "ingest", "retry", "backfill"])
def test_dead_broker_is_one_clear_line(tmp_path: Path, command: str) -> None:
    dead = f"127.0.0.1:{_closed_port()}"
    args = [command, "--bootstrap", dead, "--data-dir", str(tmp_path / "data")]
    if command == "up":
        args += ["--port", str(free_port())]
    if command == "backfill":
        args += ["--topic", "user-actions", "--from", "0", "--to", "1"]
    env = _env(FEATUREPLANE_METRICS_PORT="0")
    started = time.monotonic()
    proc = _cli(*args, env=env, cwd=tmp_path)
    line = _one_line_error(proc)
    assert f"cannot reach Kafka at {dead}" in line and "--bootstrap" in line, line
    assert "FEATUREPLANE_KAFKA_BOOTSTRAP" in line
    assert time.monotonic() - started < 20, "a dead broker must be reported at once"


# ---------------------------------------------------------------- taken ports


def test_taken_http_port_is_reported_before_anything_starts(tmp_path: Path, listener: int) -> None:
    data = tmp_path / "data"
    proc = _cli("up", "--data-dir", str(data), "--port", str(listener), env=_env(), cwd=tmp_path)
    line = _one_line_error(proc)
    assert f"port {listener}" in line and "already in use" in line, line
    assert "--port" in line and "FEATUREPLANE_PORT" in line, line
    # Nothing was started: no broker, no dataflow, no log folder.
    assert not (data / "broker").exists() and not (data / "logs").exists()
    assert not _processes_mentioning(str(data))


def test_taken_metrics_port_is_a_clear_error(
    tmp_path: Path, listener: int, kafka_bootstrap: str
) -> None:
    env = _env(FEATUREPLANE_KAFKA_BOOTSTRAP=kafka_bootstrap)
    args = ["ingest", "--metrics-port", str(listener), "--data-dir", str(tmp_path / "data")]
    proc = _cli(*args, env=env, cwd=tmp_path)
    line = _one_line_error(proc)
    assert f"port {listener}" in line and "already in use" in line, line
    assert "--metrics-port" in line and "FEATUREPLANE_METRICS_PORT" in line, line


# ---------------------------------------------------------------- metrics defaults


def _metrics_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            return bool(resp.status == 200 and b"featureplane_ingest" in resp.read())
    except OSError:
        return False


def test_ingest_and_retry_metrics_both_come_up_on_one_host(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "featureplane.cli", "retry", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "9101" in help_text and "FEATUREPLANE_METRICS_PORT" in help_text
    env = _env(
        FEATUREPLANE_KAFKA_BOOTSTRAP=kafka_bootstrap,
        FEATUREPLANE_KAFKA_GROUP=f"ports-{uuid.uuid4().hex[:8]}",
        FEATUREPLANE_DATA_DIR=str(tmp_path / "data"),
    )
    procs = [_cli(cmd, env=env, cwd=tmp_path) for cmd in ("ingest", "retry")]
    try:
        deadline = time.monotonic() + 60
        while not (_metrics_up(9100) and _metrics_up(9101)):
            for p in procs:
                assert p.poll() is None, p.communicate()[0]
            assert time.monotonic() < deadline, "metrics not served on 9100 and 9101"
            time.sleep(0.2)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [_finish(p) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert "0.0.0.0:9100/metrics" in outs[0] and "0.0.0.0:9101/metrics" in outs[1]


# ---------------------------------------------------------------- cluster mode


@pytest.mark.parametrize("kind", ["ingest", "retry"])
def test_bytewax_run_builds_the_dataflow_from_its_factory(
    tmp_path: Path, kafka_bootstrap: str, kind: str
) -> None:
    """`python -m bytewax.run "featureplane.flows.<kind>:flow()"`, as the docs give it: it
    reads, and SIGTERM stops it gracefully."""
    env = _env(
        FEATUREPLANE_KAFKA_BOOTSTRAP=kafka_bootstrap,
        FEATUREPLANE_KAFKA_GROUP=f"cluster-{uuid.uuid4().hex[:8]}",
        FEATUREPLANE_METRICS_PORT="0",
        FEATUREPLANE_DATA_DIR=str(tmp_path / "data"),
    )
    log = tmp_path / "out.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", f"featureplane.flows.{kind}:flow()"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while f"{kind} worker 1/1: reading" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "Traceback" not in text and "consumer closed" in text, text

"""`batch run` and `batch status` with fake shards: DAG order, failure, resume, timeout,
interrupts, the run records, the measured speed and the metrics file.

The runner is real (spawned worker processes, the SQLite records, signals); only
`plan_job` and `run_shard` are fakes, steered by the job names and by
FP_TEST_FAIL (shards that fail) and FP_TEST_MARKS (a folder where each shard run
leaves a file), which the spawned workers inherit.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from featureplane.batch import runner, workers
from featureplane.batch.progress import JobBoard
from featureplane.batch.runs import Runs, measured_speed, pid_alive
from featureplane.batch.shards import JobPlan, ShardResult
from featureplane.batch.status import status
from featureplane.errors import FeatureplaneError
from featureplane.jobs import BatchJob
from featureplane.settings import Settings
from featureplane.spec import Catalog, load_catalog

SPEC = """\
feature_groups:
  - name: g
    entity: user
    kind: latest
    features: [{name: x, type: int}]
batch_jobs:
  - {name: a, load: {group: g, source: "a/{date}.jsonl"}, parallelism: 2,
     schedule: "30 3 * * *"}
  - {name: bad, load: {group: g, source: "b.jsonl"}, parallelism: 2}
  - {name: after_bad, load: {group: g, source: "c.jsonl"}, parallelism: 1, after: [bad]}
  - {name: after_a, load: {group: g, source: "d.jsonl"}, parallelism: 1, after: [a]}
  - {name: slow, load: {group: g, source: "e.jsonl"}, parallelism: 2, timeout: 1s}
  - {name: stuck, load: {group: g, source: "f.jsonl"}, parallelism: 2}
  - {name: deaf, load: {group: g, source: "h.jsonl"}, parallelism: 1, timeout: 1s}
"""
AT = 1_764_473_400_000  # 2025-11-30T03:30:00Z


async def fake_plan(
    settings: Settings, catalog: Catalog, job: BatchJob, at_ms: int, speed: float | None
) -> JobPlan:
    n = job.parallelism if isinstance(job.parallelism, int) else 1
    return JobPlan(job, at_ms, n, 1000 * n, "bytes", f"{n} files", 1.0, False, 1.0, "fixed")


async def fake_shard(
    settings: Settings,
    catalog: Catalog,
    job: BatchJob,
    at_ms: int,
    shard: tuple[int, int],
    report: Callable[[int, int], None] | None = None,
    rejects: Path | None = None,
) -> ShardResult:
    name = f"{job.name}.{shard[0]}"
    (Path(os.environ["FP_TEST_MARKS"]) / f"{name}.{time.monotonic_ns()}").touch()
    if job.name == "deaf":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if job.name in ("slow", "stuck", "deaf"):
        await asyncio.sleep(60)
    if name in os.environ.get("FP_TEST_FAIL", "").split(","):
        raise FeatureplaneError(f"boom in {name}")
    assert report is not None
    report(10, 1)
    return ShardResult(10 + shard[0], 1, 1000)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, Catalog, Path]:
    (tmp_path / "spec.yaml").write_text(SPEC)
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("FP_TEST_MARKS", str(marks))
    settings = Settings(spec=tmp_path / "spec.yaml", data_dir=tmp_path / "data")
    return settings, load_catalog(settings.spec), marks


def _run(
    settings: Settings, catalog: Catalog, jobs: list[str], *, new: bool = False
) -> tuple[int, str]:
    out = io.StringIO()
    code = runner.run(
        settings,
        catalog,
        jobs,
        AT,
        workers=2,
        new=new,
        plan_job=fake_plan,
        run_shard=fake_shard,
        out=out,
    )
    return code, out.getvalue()


def _ran(marks: Path) -> list[str]:
    return sorted(p.name.rsplit(".", 1)[0] for p in marks.iterdir())


def test_failed_job_stops_its_dependents_and_a_rerun_does_only_what_is_left(
    env: tuple[Settings, Catalog, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, catalog, marks = env
    monkeypatch.setenv("FP_TEST_FAIL", "bad.1")
    code, err = _run(settings, catalog, ["after_bad", "after_a"])
    assert code == 1
    runs = Runs.open(settings)
    (run,) = runs.recent(5)
    states = {j.name: (j.state, j.error) for j in run.job_records}
    assert states == {
        "a": ("succeeded", None),
        "bad": ("failed", "shard 1 failed: boom in bad.1"),
        "after_bad": ("skipped", "not run: bad did not succeed"),
        "after_a": ("succeeded", None),
    }
    assert run.state == "failed" and (run.done, run.total) == (4, 5)
    log = settings.data_dir / "batch" / "logs" / run.id / "bad.1.log"
    assert f"bad shard 1: boom in bad.1\n    log: {log}" in err
    assert "boom in bad.1" in log.read_text()
    assert _ran(marks) == ["a.0", "a.1", "after_a.0", "bad.0", "bad.1"]

    # the fix is in: the same command resumes the run, only bad.1 and after_bad run
    monkeypatch.delenv("FP_TEST_FAIL")
    for p in marks.iterdir():
        p.unlink()
    code, err = _run(settings, catalog, ["after_a", "after_bad"])
    assert code == 0, err
    assert f"resuming run {run.id}: 4 of 5 shards done" in err
    assert _ran(marks) == ["after_bad.0", "bad.1"]
    again = runs.get(run.id)
    assert again.state == "succeeded" and (again.done, again.total) == (6, 6)
    assert [s.attempts for s in again.shards_of("bad")] == [1, 2]
    assert "after_a: succeeded, 1/1 shards, 10 rows" in err

    # a succeeded run is not resumed: the next is a new one
    code, err = _run(settings, catalog, ["after_a", "after_bad"])
    assert code == 0 and len(runs.recent(5)) == 2
    runs.close()


def test_resume_picks_the_latest_run_of_the_same_jobs(
    env: tuple[Settings, Catalog, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, catalog, _ = env
    monkeypatch.setenv("FP_TEST_FAIL", "a.0")
    assert _run(settings, catalog, ["a"])[0] == 1
    assert _run(settings, catalog, ["after_a"])[0] == 1  # another job set: its own run
    runs = Runs.open(settings)
    first, second = runs.recent(5)[::-1]
    assert first.job_set == "a" and second.job_set == "a,after_a"
    monkeypatch.delenv("FP_TEST_FAIL")
    code, err = _run(settings, catalog, ["a"])
    assert code == 0 and f"resuming run {first.id}: 1 of 2 shards done" in err
    assert runs.get(second.id).state == "failed"
    # --new ignores the failed run of a,after_a
    code, err = _run(settings, catalog, ["after_a"], new=True)
    assert code == 0 and "resuming" not in err and len(runs.recent(5)) == 3
    runs.close()


def test_a_job_past_its_timeout_is_stopped_and_fails(
    env: tuple[Settings, Catalog, Path],
) -> None:
    settings, catalog, _ = env
    started = time.monotonic()
    code, err = _run(settings, catalog, ["slow"])
    assert code == 1 and time.monotonic() - started < 15
    runs = Runs.open(settings)
    (run,) = runs.recent(1)
    assert [(j.state, j.error) for j in run.job_records] == [("failed", "timed out after 1s")]
    assert [(s.state, s.error) for s in run.shards_of("slow")] == [
        ("failed", "timed out after 1s"),
        ("failed", "timed out after 1s"),
    ]
    assert "slow: failed" in err
    runs.close()


def test_a_shard_that_ignores_sigterm_is_killed(
    env: tuple[Settings, Catalog, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, catalog, _ = env
    monkeypatch.setattr(workers, "STOP_GRACE_S", 0.5)
    started = time.monotonic()
    code, _ = _run(settings, catalog, ["deaf"])
    assert code == 1 and time.monotonic() - started < 10  # it sleeps 60 s unless killed
    runs = Runs.open(settings)
    (run,) = runs.recent(1)
    assert [(s.state, s.error) for s in run.shards_of("deaf")] == [("failed", "timed out after 1s")]
    runs.close()


def test_unknown_job_is_an_error_with_a_suggestion(env: tuple[Settings, Catalog, Path]) -> None:
    settings, catalog, _ = env
    with pytest.raises(FeatureplaneError, match=r"unknown batch job 'afterA' \(did you mean"):
        _run(settings, catalog, ["afterA"])


_INTERRUPTED = """
import os, signal, sys, threading
from tests.unit.test_batch_runs import AT, fake_plan, fake_shard
from featureplane.batch import runner
from featureplane.batch.progress import JobBoard
from featureplane.settings import Settings
from featureplane.spec import load_catalog
settings = Settings(spec=sys.argv[1], data_dir=sys.argv[2])
sys.exit(runner.run(settings, load_catalog(settings.spec), ["stuck"], AT, workers=2, new=False,
                    plan_job=fake_plan, run_shard=fake_shard))
"""


def test_sigterm_interrupts_the_run_and_status_says_so(
    env: tuple[Settings, Catalog, Path],
) -> None:
    settings, _, marks = env
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED, str(settings.spec), str(settings.data_dir)],
        cwd=root,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted: run the same command again to resume it" in err
    runs = Runs.open(settings)
    (run,) = runs.recent(1)
    assert run.state == "interrupted"
    assert [s.state for s in run.shards_of("stuck")] == ["pending", "pending"]
    runs.close()
    out = io.StringIO()
    assert status(settings, limit=5, as_json=False, out=out) == 0
    assert f"{run.id}  interrupted  shards 0/2" in out.getvalue()


def test_workers_stop_when_the_runner_is_killed(env: tuple[Settings, Catalog, Path]) -> None:
    settings, _, marks = env
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED, str(settings.spec), str(settings.data_dir)],
        cwd=root,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    runs = Runs.open(settings)
    pids = [s.pid for s in runs.recent(1)[0].shards_of("stuck")]
    proc.kill()
    proc.wait()
    assert all(pids)
    while any(pid_alive(p) for p in pids if p) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in pids if p)  # they would sleep 60 s
    assert runs.recent(1)[0].state == "interrupted"
    runs.close()


def test_a_run_whose_process_died_shows_as_interrupted_and_is_resumed(
    env: tuple[Settings, Catalog, Path],
) -> None:
    settings, catalog, marks = env
    runs = Runs.open(settings)
    run_id = runs.create(["a"], [("a", 60_000)], AT)
    runs.plan(run_id, "a", 2, "bytes", 2000, "fixed")
    runs.set_job(run_id, "a", "running")
    runs.start_shard(run_id, "a", 0, 1, "x.log")
    runs.end_shard(run_id, "a", 0, "done", rows=5, rejected=0, work=1000, seconds=2.0)
    runs.start_shard(run_id, "a", 1, 1, "y.log")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    runs.db.execute("UPDATE runs SET pid=? WHERE id=?", (int(dead.stdout), run_id))
    assert runs.get(run_id).state == "interrupted"
    out = io.StringIO()
    status(settings, limit=5, as_json=True, out=out)
    (shown,) = orjson.loads(out.getvalue())
    assert (shown["id"], shown["state"], shown["shards_done"], shown["shards"]) == (
        run_id,
        "interrupted",
        1,
        2,
    )
    code, err = _run(settings, catalog, ["a"])
    assert code == 0 and f"resuming run {run_id}: 1 of 2 shards done" in err
    assert _ran(marks) == ["a.1"]  # N kept from the record: 2 shards, shard 0 not redone
    runs.close()


def test_status_lists_runs_newest_first_with_failures_and_logs(
    env: tuple[Settings, Catalog, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, catalog, _ = env
    out = io.StringIO()
    status(settings, limit=5, as_json=False, out=out)
    assert out.getvalue() == f"no batch runs recorded in {settings.data_dir}\n"
    assert _run(settings, catalog, ["a"])[0] == 0
    monkeypatch.setenv("FP_TEST_FAIL", "bad.0")
    assert _run(settings, catalog, ["bad"])[0] == 1
    out = io.StringIO()
    status(settings, limit=5, as_json=False, out=out)
    lines = out.getvalue().splitlines()
    runs = Runs.open(settings)
    failed, ok = runs.recent(5)
    log = settings.data_dir / "batch" / "logs" / failed.id / "bad.0.log"
    assert lines[0].startswith(f"{failed.id}  failed  shards 1/2  rows 11  rejects 1  started ")
    assert lines[1] == "  bad: failed, 1/2 shards, 11 rows (shard 0 failed: boom in bad.0)"
    assert lines[2] == f"    shard 0/2 failed: boom in bad.0  log: {log}"
    assert lines[3].startswith(f"{ok.id}  succeeded  shards 2/2  rows 21  rejects 2  ")
    assert lines[4] == "  a: succeeded, 2/2 shards, 21 rows"
    out = io.StringIO()
    status(settings, limit=1, as_json=True, out=out)
    (shown,) = orjson.loads(out.getvalue())
    assert shown["failed"][0]["log"] == str(log) and shown["rows"] == 11
    runs.close()


def test_measured_speed_is_the_median_of_the_latest_done_shards(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert measured_speed(settings, "a") is None
    runs = Runs.open(settings)
    run_id = runs.create([], [("a", 1000), ("b", 1000)], AT)
    runs.plan(run_id, "a", 14, "bytes", 0, "")
    for i, (work, seconds) in enumerate([(100, 1.0), (300, 1.0), (1000, 2.0), (50, 0.0)]):
        runs.end_shard(run_id, "a", i, "done", rows=1, rejected=0, work=work, seconds=seconds)
    runs.end_shard(run_id, "a", 4, "failed", rows=1, rejected=0, work=10**9, seconds=1.0)
    assert measured_speed(settings, "a") == 300.0  # of 100, 300, 500; no 0 s, no failure
    assert measured_speed(settings, "b") is None
    for i in range(5, 14):  # only the latest 10 count
        runs.end_shard(run_id, "a", i, "done", rows=1, rejected=0, work=9000, seconds=1.0)
    assert measured_speed(settings, "a") == 9000.0
    runs.close()


def test_metrics_file_has_every_job_of_the_latest_runs(
    env: tuple[Settings, Catalog, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, catalog, _ = env
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    code, err = _run(settings.model_copy(update={"pushgateway_url": dead}), catalog, ["a"])
    assert code == 0  # a Pushgateway that does not answer is a warning, not a failure
    assert f"warning: could not push metrics to the Pushgateway at {dead}" in err
    monkeypatch.setenv("FP_TEST_FAIL", "bad.1")
    assert _run(settings, catalog, ["bad"])[0] == 1
    text = (settings.data_dir / "batch" / "metrics.prom").read_text()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, job: str, **labels: str) -> float:
        return got[(f"featureplane_batch_{name}", tuple(sorted({"job": job, **labels}.items())))]

    assert value("run_state", "a", state="succeeded") == 1
    assert value("run_state", "a", state="failed") == 0
    assert value("run_state", "bad", state="failed") == 1
    assert value("shards", "a") == 2 and value("shards_done", "a") == 2
    assert value("shards_done", "bad") == 1
    assert value("rows_written", "a") == 21 and value("rejects", "a") == 2
    assert value("run_timeout_seconds", "a") == 6 * 3600
    assert time.time() - 60 < value("last_success_timestamp_seconds", "a") <= time.time()
    assert time.time() - 60 < value("run_start_timestamp_seconds", "bad") <= time.time()
    # a's schedule "30 3 * * *": next fire the day after AT, a day apart
    assert value("next_run_timestamp_seconds", "a") == AT / 1000 + 86400
    assert value("period_seconds", "a") == 86400
    names = {name for name, labels in got if dict(labels).get("job") == "bad"}
    assert "featureplane_batch_last_success_timestamp_seconds" not in names
    assert "featureplane_batch_next_run_timestamp_seconds" not in names  # no schedule


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_board_prints_plain_lines_at_most_every_5s_off_a_terminal() -> None:
    out, clock = io.StringIO(), _Clock()
    board = JobBoard(["a", "b"], out, clock=clock)
    board.update("a", event=True, state="running", shards=4)
    board.update("a", rows=100, done=1, fraction=0.25)
    clock.now += 2
    board.update("a", rows=200, fraction=0.5)
    board.tick()
    clock.now += 3.5
    board.update("a", rows=300, done=2, fraction=0.5)
    board.tick()
    clock.now += 1
    board.update("a", event=True, state="succeeded", rows=500, done=4, fraction=1.0)
    assert out.getvalue().splitlines() == [
        "a: running, 0/4 shards, 0 rows (0/s), ETA ?",
        "a: running, 2/4 shards, 300 rows (55/s), ETA 0:06",
        "a: succeeded, 4/4 shards, 500 rows (77/s), 6.5s",
    ]

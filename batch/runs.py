"""The record of batch runs on this machine: what `batch run` did, `batch status` shows.

SQLite at `<data_dir>/batch/runs.sqlite` (WAL, so `batch status` reads while a
run writes). A run has the jobs asked, its time `at`, a state and the process
that runs it; each job its shard count N, fixed when the job is first planned so
that a resumed run splits the input exactly as the first attempt did; each shard
its state, counts, time, error and log file. A run left "running" by a process
that is gone is shown, and resumed, as interrupted.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import orjson

from featureplane.jobs import iso_time
from featureplane.settings import Settings

__all__ = [
    "SPEED_SAMPLES",
    "JobRecord",
    "JobState",
    "RunRecord",
    "RunState",
    "Runs",
    "ShardRecord",
    "ShardState",
    "last_runs",
    "measured_speed",
    "pid_alive",
]

RunState = Literal["running", "succeeded", "failed", "interrupted"]
JobState = Literal["pending", "running", "succeeded", "failed", "skipped"]
ShardState = Literal["pending", "running", "done", "failed"]
SPEED_SAMPLES = 10
"""`measured_speed` is the median over this many of the job's latest done shards."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, jobs TEXT NOT NULL, job_set TEXT NOT NULL, at_ms INTEGER NOT NULL,
    state TEXT NOT NULL, started INTEGER NOT NULL, ended INTEGER, pid INTEGER, host TEXT);
CREATE TABLE IF NOT EXISTS jobs (
    run TEXT NOT NULL, name TEXT NOT NULL, position INTEGER NOT NULL, shards INTEGER,
    state TEXT NOT NULL, timeout_ms INTEGER NOT NULL, unit TEXT, size INTEGER, reason TEXT,
    error TEXT, started INTEGER, ended INTEGER, PRIMARY KEY (run, name));
CREATE TABLE IF NOT EXISTS shards (
    run TEXT NOT NULL, job TEXT NOT NULL, shard INTEGER NOT NULL, state TEXT NOT NULL,
    rows INTEGER NOT NULL DEFAULT 0, rejected INTEGER NOT NULL DEFAULT 0,
    work INTEGER NOT NULL DEFAULT 0, seconds REAL NOT NULL DEFAULT 0, error TEXT, log TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, pid INTEGER, ended INTEGER,
    PRIMARY KEY (run, job, shard));
CREATE INDEX IF NOT EXISTS runs_by_set ON runs (job_set, started);
CREATE INDEX IF NOT EXISTS done_shards ON shards (job, state, ended);
"""


@dataclass(frozen=True, slots=True)
class ShardRecord:
    job: str
    shard: int
    state: ShardState
    rows: int
    rejected: int
    work: int
    seconds: float
    error: str | None
    log: str | None
    attempts: int
    pid: int | None


@dataclass(frozen=True, slots=True)
class JobRecord:
    name: str
    shards: int | None
    """N, fixed once planned; None until the job was first planned."""
    state: JobState
    timeout_ms: int
    unit: str | None
    size: int | None
    reason: str | None
    error: str | None
    started: int | None
    ended: int | None


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: str
    jobs: tuple[str, ...]
    """The jobs as asked (empty: all of them)."""
    job_set: str
    """Every job the run does, sorted and comma-joined: what a rerun is matched on."""
    at_ms: int
    state: RunState
    started: int
    ended: int | None
    pid: int | None
    host: str | None
    job_records: tuple[JobRecord, ...]
    shard_records: tuple[ShardRecord, ...]

    def shards_of(self, job: str) -> list[ShardRecord]:
        return [s for s in self.shard_records if s.job == job]

    @property
    def done(self) -> int:
        return sum(s.state == "done" for s in self.shard_records)

    @property
    def total(self) -> int:
        return sum(j.shards or 0 for j in self.job_records)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class Runs:
    """The runs database; every method is one short transaction."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.clock = path, clock
        # isolation_level=None: autocommit, explicit BEGIN where several writes go together
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self.host = socket.gethostname()

    @classmethod
    def open(cls, settings: Settings) -> Runs:
        return cls(settings.data_dir / "batch" / "runs.sqlite")

    def close(self) -> None:
        self.db.close()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------ writes

    def create(self, asked: Sequence[str], jobs: Sequence[tuple[str, int]], at_ms: int) -> str:
        """A new running run of `jobs` ((name, timeout ms) in DAG order); its id."""
        now = self.now_ms()
        stamp = datetime.fromtimestamp(now / 1000, UTC).strftime("%Y%m%d-%H%M%S")
        run_id = f"{stamp}-{secrets.token_hex(2)}"
        job_set = ",".join(sorted(name for name, _ in jobs))
        with self._tx() as db:
            db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, 'running', ?, NULL, ?, ?)",
                (run_id, orjson.dumps(list(asked)), job_set, at_ms, now, os.getpid(), self.host),
            )
            db.executemany(
                "INSERT INTO jobs (run, name, position, state, timeout_ms) "
                "VALUES (?, ?, ?, 'pending', ?)",
                [(run_id, name, i, timeout) for i, (name, timeout) in enumerate(jobs)],
            )
        return run_id

    def resume(self, run_id: str) -> None:
        """Take over a run: this process runs it; what did not succeed is pending again."""
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET state='running', ended=NULL, pid=?, host=? WHERE id=?",
                (os.getpid(), self.host, run_id),
            )
            db.execute(
                "UPDATE jobs SET state='pending', error=NULL, started=NULL, ended=NULL "
                "WHERE run=? AND state != 'succeeded'",
                (run_id,),
            )
            db.execute(
                "UPDATE shards SET state='pending', pid=NULL WHERE run=? AND state != 'done'",
                (run_id,),
            )

    def plan(self, run_id: str, job: str, shards: int, unit: str, size: int, reason: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET shards=?, unit=?, size=?, reason=? WHERE run=? AND name=?",
                (shards, unit, size, reason, run_id, job),
            )
            db.executemany(
                "INSERT OR IGNORE INTO shards (run, job, shard, state) VALUES (?, ?, ?, 'pending')",
                [(run_id, job, i) for i in range(shards)],
            )

    def set_job(self, run_id: str, job: str, state: JobState, error: str | None = None) -> None:
        now = self.now_ms()
        started = now if state == "running" else None
        ended = now if state in ("succeeded", "failed", "skipped") else None
        self.db.execute(
            "UPDATE jobs SET state=?, error=?, started=COALESCE(?, started), ended=? "
            "WHERE run=? AND name=?",
            (state, error, started, ended, run_id, job),
        )

    def start_shard(self, run_id: str, job: str, shard: int, pid: int | None, log: str) -> None:
        self.db.execute(
            "UPDATE shards SET state='running', pid=?, log=?, attempts=attempts+1, error=NULL, "
            "rows=0, rejected=0 WHERE run=? AND job=? AND shard=?",
            (pid, log, run_id, job, shard),
        )

    def shard_progress(self, run_id: str, job: str, shard: int, rows: int, rejected: int) -> None:
        self.db.execute(
            "UPDATE shards SET rows=?, rejected=? WHERE run=? AND job=? AND shard=?",
            (rows, rejected, run_id, job, shard),
        )

    def end_shard(
        self,
        run_id: str,
        job: str,
        shard: int,
        state: ShardState,
        *,
        rows: int,
        rejected: int,
        work: int = 0,
        seconds: float = 0.0,
        error: str | None = None,
    ) -> None:
        self.db.execute(
            "UPDATE shards SET state=?, rows=?, rejected=?, work=?, seconds=?, error=?, ended=?, "
            "pid=NULL WHERE run=? AND job=? AND shard=?",
            (state, rows, rejected, work, seconds, error, self.now_ms(), run_id, job, shard),
        )

    def end(self, run_id: str, state: RunState) -> None:
        self.db.execute(
            "UPDATE runs SET state=?, ended=? WHERE id=?", (state, self.now_ms(), run_id)
        )

    # ------------------------------------------------------------ reads

    def get(self, run_id: str) -> RunRecord:
        row = self.db.execute(
            "SELECT id, jobs, job_set, at_ms, state, started, ended, pid, host FROM runs "
            "WHERE id=?",
            (run_id,),
        ).fetchone()
        if row is None:
            raise KeyError(run_id)
        jobs = tuple(
            JobRecord(*r)
            for r in self.db.execute(
                "SELECT name, shards, state, timeout_ms, unit, size, reason, error, started, "
                "ended FROM jobs WHERE run=? ORDER BY position",
                (run_id,),
            )
        )
        order = {j.name: i for i, j in enumerate(jobs)}
        shards = sorted(
            (
                ShardRecord(*r)
                for r in self.db.execute(
                    "SELECT job, shard, state, rows, rejected, work, seconds, error, log, "
                    "attempts, pid FROM shards WHERE run=?",
                    (run_id,),
                )
            ),
            key=lambda s: (order.get(s.job, 0), s.shard),
        )
        run_id, asked, job_set, at_ms, state, started, ended, pid, host = row
        run = RunRecord(
            run_id,
            tuple(orjson.loads(asked)),
            job_set,
            at_ms,
            state,
            started,
            ended,
            pid,
            host,
            jobs,
            tuple(shards),
        )
        return self._effective(run)

    def _effective(self, run: RunRecord) -> RunRecord:
        """A run "running" on this host whose process is gone is interrupted."""
        if run.state != "running" or run.host != self.host or run.pid is None:
            return run
        if pid_alive(run.pid):
            return run
        return replace(run, state="interrupted")

    def latest(self, job_set: str) -> RunRecord | None:
        """The newest run of exactly these jobs (sorted, comma-joined names)."""
        row = self.db.execute(
            "SELECT id FROM runs WHERE job_set=? ORDER BY started DESC, id DESC LIMIT 1",
            (job_set,),
        ).fetchone()
        return None if row is None else self.get(row[0])

    def latest_with(self, job: str) -> RunRecord | None:
        """The newest run that has `job` among its jobs."""
        row = self.db.execute(
            "SELECT r.id FROM runs r JOIN jobs j ON j.run = r.id WHERE j.name=? "
            "ORDER BY r.started DESC, r.id DESC LIMIT 1",
            (job,),
        ).fetchone()
        return None if row is None else self.get(row[0])

    def recent(self, limit: int) -> list[RunRecord]:
        rows = self.db.execute(
            "SELECT id FROM runs ORDER BY started DESC, id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [self.get(r[0]) for r in rows]

    def measured_speed(self, job: str, samples: int = SPEED_SAMPLES) -> float | None:
        rows = self.db.execute(
            "SELECT work, seconds FROM shards WHERE job=? AND state='done' AND seconds > 0 "
            "AND work > 0 ORDER BY ended DESC LIMIT ?",
            (job, samples),
        ).fetchall()
        return statistics.median(w / s for w, s in rows) if rows else None

    def last_success(self, job: str) -> int | None:
        """When the job last succeeded in any run (epoch ms)."""
        row = self.db.execute(
            "SELECT MAX(ended) FROM jobs WHERE name=? AND state='succeeded'", (job,)
        ).fetchone()
        return None if row is None else row[0]


def measured_speed(settings: Settings, job_name: str) -> float | None:
    """The job's per-shard speed on this machine, work units (bytes or records) a second:
    the median of its latest `SPEED_SAMPLES` (10) done shards; None before any."""
    path = settings.data_dir / "batch" / "runs.sqlite"
    if not path.exists():
        return None
    runs = Runs(path)
    try:
        return runs.measured_speed(job_name)
    finally:
        runs.close()


def last_runs(settings: Settings, jobs: Sequence[str]) -> dict[str, dict[str, str]]:
    """Each job's state in the newest run that has it, and when that run started (ISO
    time, UTC), from this machine's record; {} before any run."""
    path = settings.data_dir / "batch" / "runs.sqlite"
    if not path.exists():
        return {}
    runs = Runs(path)
    try:
        out = {}
        for job in jobs:
            run = runs.latest_with(job)
            record = (
                None if run is None else next((j for j in run.job_records if j.name == job), None)
            )
            if run is not None and record is not None:
                state = run.state if record.state == "running" else record.state
                out[job] = {"state": state, "when": iso_time(run.started)}
        return out
    finally:
        runs.close()

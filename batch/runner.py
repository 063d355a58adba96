"""`featureplane batch run`: batch jobs and their dependencies on this machine, resumable.

Jobs start in DAG order, each when the jobs in its `after` have succeeded in
this run; a job is planned (`plan_job`, at the speed measured by earlier runs)
when it starts, and its shard count is recorded, so a resumed run splits its
input exactly as the first attempt did. Shards run in worker processes (at most
`workers` at once across jobs), each logging to
`<data_dir>/batch/logs/<run>/<job>.<I>.log`.

Workers are `multiprocessing` spawn processes running `run_shard`, the code path
of `featureplane load|backfill --shard I/N --at`: the settings and catalog go
over as objects (no second parse of flags, environment or spec), and counts
come back over a pipe as numbers, not as text to parse. A pipe per worker, so a
worker killed mid-write garbles nothing but its own.

A failed shard fails its job (its running shards finish, no new one starts),
the job's dependents are skipped, independent jobs finish, and the run fails.
A job past its timeout has its shards stopped (SIGTERM, SIGKILL 10 s later).
SIGINT/SIGTERM stop every worker the same way and record the run as
interrupted; running the same command again resumes it, doing only the shards
not done.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from featureplane.batch import metrics
from featureplane.batch.progress import JobBoard
from featureplane.batch.runs import JobState, Runs
from featureplane.batch.status import duration_text
from featureplane.errors import FeatureplaneError
from featureplane.jobs import BatchJob, needed
from featureplane.settings import Settings
from featureplane.spec import Catalog

if TYPE_CHECKING:
    from featureplane.batch.shards import JobPlan, ShardResult

__all__ = ["STOP_GRACE_S", "PlanFn", "ShardFn", "run"]

log = logging.getLogger(__name__)
STOP_GRACE_S = 10.0
"""A worker told to stop (SIGTERM) is killed (SIGKILL) this long after."""
_SAVE_EVERY_S = 5.0
PlanFn = Callable[
    [Settings, Catalog, BatchJob, int, "float | None"], Coroutine[Any, Any, "JobPlan"]
]
ShardFn = Callable[..., Coroutine[Any, Any, "ShardResult"]]


def _shard_process(
    conn: Connection,
    settings: Settings,
    catalog: Catalog,
    job: BatchJob,
    at_ms: int,
    shard: tuple[int, int],
    log_path: Path,
    run_shard: ShardFn,
) -> None:
    """A worker: one shard, its output to its log file, its counts to the runner."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides when shards stop
    _die_with_runner()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    print(f"{_iso(time.time() * 1000)} {job.name} shard {shard[0]}/{shard[1]}, pid {os.getpid()}")
    sys.stdout.flush()

    def report(done: int, rejected: int) -> None:
        conn.send(("progress", done, rejected))

    rejects = log_path.with_suffix(".rejects.jsonl")
    started = time.monotonic()  # after start-up and imports: the speed is the shard's own
    try:
        result = asyncio.run(run_shard(settings, catalog, job, at_ms, shard, report, rejects))
    except FeatureplaneError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        conn.send(("failed", str(exc)))
        sys.exit(1)
    except Exception as exc:  # any failure is the shard's reason; its trace goes to the log
        traceback.print_exc()
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    print(f"done: {result.done:,} written, {result.rejected:,} rejected, {result.work:,} units")
    conn.send(("done", result.done, result.rejected, result.work, time.monotonic() - started))


def _die_with_runner() -> None:
    """On Linux, a worker gets SIGTERM when its runner dies (even by SIGKILL or the OOM
    killer), instead of writing on unwatched while a rerun starts the same shard again."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the runner died before the call above
        os._exit(1)


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _timeout_text(ms: int) -> str:
    parts, rest = [], ms
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or f"{ms}ms"


@dataclass(slots=True)
class _Worker:
    job: str
    shard: int
    process: BaseProcess
    conn: Connection | None
    started: float
    rows: int = 0
    rejected: int = 0
    result: tuple[int, int, int, float] | None = None
    error: str | None = None
    stopping: str | None = None
    """Why the runner stopped it (a timeout, a signal); None while it runs its course."""
    term_at: float | None = None
    saved: float = 0.0


@dataclass(slots=True)
class _Job:
    spec: BatchJob
    state: JobState
    shards: int | None
    unit: str | None = None
    size: int = 0
    speed: float | None = None
    """Work units a second one shard does (planned or measured): the ETA before a shard ends."""
    pending: deque[int] = field(default_factory=deque)
    started: float | None = None
    done: int = 0
    work_done: int = 0
    rows_done: int = 0
    rejects_done: int = 0
    error: str | None = None


class _Runner:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        runs: Runs,
        run_id: str,
        at_ms: int,
        *,
        workers: int,
        plan_job: PlanFn,
        run_shard: ShardFn,
        board: JobBoard,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.catalog, self.runs = settings, catalog, runs
        self.run_id, self.at_ms, self.workers = run_id, at_ms, workers
        self.plan_job, self.run_shard, self.board, self.clock = plan_job, run_shard, board, clock
        self.ctx = multiprocessing.get_context("spawn")
        self.active: list[_Worker] = []
        self.signal: int | None = None
        self.logs = settings.data_dir / "batch" / "logs" / run_id
        self.logs.mkdir(parents=True, exist_ok=True)
        record = runs.get(run_id)
        self.jobs: dict[str, _Job] = {}
        for j in record.job_records:
            job = _Job(catalog.jobs[j.name], j.state, j.shards, j.unit, j.size or 0)
            for s in record.shards_of(j.name):
                if s.state == "done":
                    job.done += 1
                    job.work_done += s.work
                    job.rows_done += s.rows
                    job.rejects_done += s.rejected
            self.jobs[j.name] = job

    # ------------------------------------------------------------ the loop

    def go(self) -> int:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            self.signal = signum

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._metrics()
            while self.signal is None:
                self._start_ready()
                self._launch()
                if not self.active:
                    break
                self._wait(0.5)
                self._check_timeouts()
                self.board.tick()
            if self.signal is not None:
                self._stop_all(f"stopped by {signal.Signals(self.signal).name}")
                for name, job in self.jobs.items():
                    if job.state == "running":
                        job.state = "pending"
                        self.runs.set_job(self.run_id, name, "pending")
                self.runs.end(self.run_id, "interrupted")
                self._metrics()
                self.board.close()
                self.board.say(
                    f"run {self.run_id} interrupted: run the same command again to resume it"
                )
                return 128 + self.signal
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        ok = all(j.state == "succeeded" for j in self.jobs.values())
        self.runs.end(self.run_id, "succeeded" if ok else "failed")
        self._metrics()
        return self._report(ok)

    def _start_ready(self) -> None:
        for name, job in self.jobs.items():
            if job.state != "pending":
                continue
            states = {dep: self.jobs[dep].state for dep in job.spec.after}
            if bad := [d for d, s in states.items() if s in ("failed", "skipped")]:
                self._end_job(name, "skipped", f"not run: {', '.join(bad)} did not succeed")
            elif all(s == "succeeded" for s in states.values()):
                self._begin(name, job)

    def _begin(self, name: str, job: _Job) -> None:
        if job.shards is None:
            try:
                plan = asyncio.run(
                    self.plan_job(
                        self.settings,
                        self.catalog,
                        job.spec,
                        self.at_ms,
                        self.runs.measured_speed(name),
                    )
                )
            except FeatureplaneError as exc:
                self._end_job(name, "failed", f"cannot plan: {exc}")
                return
            job.shards, job.unit, job.size, job.speed = (
                plan.shards,
                plan.unit,
                plan.size,
                plan.speed,
            )
            self.runs.plan(self.run_id, name, plan.shards, plan.unit, plan.size, plan.reason)
            shards = f"{plan.shards} shard" + ("s" if plan.shards != 1 else "")
            self.board.say(f"{name}: {shards} ({plan.inputs}; {plan.reason})")
        elif job.speed is None:
            job.speed = self.runs.measured_speed(name)
        record = self.runs.get(self.run_id)
        job.pending = deque(s.shard for s in record.shards_of(name) if s.state != "done")
        job.started = self.clock()
        job.state = "running"
        self.runs.set_job(self.run_id, name, "running")
        self._show(name, event=True)
        self._metrics()
        if not job.pending:
            self._end_job(name, "succeeded")

    def _launch(self) -> None:
        for name, job in self.jobs.items():
            while job.state == "running" and job.pending and len(self.active) < self.workers:
                self._spawn(name, job, job.pending.popleft())

    def _spawn(self, name: str, job: _Job, shard: int) -> None:
        assert job.shards is not None
        log_path = self.logs / f"{name}.{shard}.log"
        reader, writer = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(
            target=_shard_process,
            args=(
                writer,
                self.settings,
                self.catalog,
                job.spec,
                self.at_ms,
                (shard, job.shards),
                log_path,
                self.run_shard,
            ),
            name=f"{name}.{shard}",
            daemon=True,  # never outlives the runner, whatever stops it
        )
        process.start()
        writer.close()  # the child holds the write end: EOF here once it exits
        self.active.append(_Worker(name, shard, process, reader, self.clock()))
        self.runs.start_shard(self.run_id, name, shard, process.pid, str(log_path))

    def _wait(self, timeout: float) -> None:
        conns = [w.conn for w in self.active if w.conn is not None]
        ready = wait([*conns, *(w.process.sentinel for w in self.active)], timeout)
        for w in list(self.active):
            if w.conn is not None and w.conn in ready:
                self._drain(w)
            if w.process.sentinel in ready or not w.process.is_alive():
                if w.conn is not None:
                    self._drain(w)
                w.process.join()
                self.active.remove(w)
                self._finish(w)
        now = self.clock()
        for w in self.active:
            if now - w.saved >= _SAVE_EVERY_S:
                w.saved = now
                self.runs.shard_progress(self.run_id, w.job, w.shard, w.rows, w.rejected)
        self._show_all()

    def _drain(self, w: _Worker) -> None:
        assert w.conn is not None
        try:
            while w.conn.poll():
                msg: tuple[Any, ...] = w.conn.recv()
                if msg[0] == "progress":
                    w.rows += msg[1]
                    w.rejected += msg[2]
                elif msg[0] == "done":
                    w.result = (msg[1], msg[2], msg[3], msg[4])
                elif msg[0] == "failed":
                    w.error = msg[1]
        except (EOFError, OSError):
            w.conn.close()
            w.conn = None

    def _finish(self, w: _Worker) -> None:
        job = self.jobs[w.job]
        seconds = self.clock() - w.started
        if w.result is not None and w.process.exitcode == 0:
            rows, rejected, work, own_seconds = w.result
            self.runs.end_shard(
                self.run_id, w.job, w.shard, "done",
                rows=rows, rejected=rejected, work=work, seconds=own_seconds,
            )  # fmt: skip
            job.done += 1
            job.work_done += work
            job.rows_done += rows
            job.rejects_done += rejected
        elif self.signal is not None:  # stopped with the run (a group-wide SIGTERM too)
            reason = w.stopping or f"stopped by {signal.Signals(self.signal).name}"
            self.runs.end_shard(
                self.run_id, w.job, w.shard, "pending", rows=0, rejected=0, error=reason
            )
        else:
            reason = w.stopping or w.error or _died(w.process.exitcode)
            self.runs.end_shard(
                self.run_id, w.job, w.shard, "failed",
                rows=w.rows, rejected=w.rejected, seconds=seconds, error=reason,
            )  # fmt: skip
            job.pending.clear()  # the job failed: start none of its other shards
            if job.error is None:
                job.error = reason if w.stopping else f"shard {w.shard} failed: {reason}"
        if not job.pending and not any(a.job == w.job for a in self.active):
            if self.signal is None:
                self._end_job(w.job, "failed" if job.error else "succeeded", job.error)
        else:
            self._metrics()

    def _end_job(self, name: str, state: JobState, error: str | None = None) -> None:
        job = self.jobs[name]
        job.state, job.error = state, error
        self.runs.set_job(self.run_id, name, state, error)
        self._show(name, event=True)
        pushed = self._metrics(push=name)
        if pushed:
            self.board.say(pushed)

    def _check_timeouts(self) -> None:
        now = self.clock()
        for name, job in self.jobs.items():
            limit = job.spec.timeout / 1000
            if job.state == "running" and job.started is not None and now - job.started > limit:
                if job.error is None:
                    job.error = f"timed out after {_timeout_text(job.spec.timeout)}"
                    job.pending.clear()
                    for w in self.active:
                        if w.job == name and w.stopping is None:
                            self._term(w, job.error, now)
                if not any(w.job == name for w in self.active):
                    self._end_job(name, "failed", job.error)
        for w in self.active:
            if w.term_at is not None and now - w.term_at >= STOP_GRACE_S:
                w.process.kill()

    def _term(self, w: _Worker, reason: str, now: float) -> None:
        w.stopping, w.term_at = reason, now
        w.process.terminate()

    def _stop_all(self, reason: str) -> None:
        now = self.clock()
        for w in self.active:
            self._term(w, reason, now)
        while self.active:
            self._wait(0.5)
            if self.clock() - now >= STOP_GRACE_S:
                for w in self.active:
                    w.process.kill()

    # ------------------------------------------------------------ output

    def _show(self, name: str, *, event: bool = False) -> None:
        job = self.jobs[name]
        running = [w for w in self.active if w.job == name]
        running_rows = sum(w.rows for w in running)
        fraction = 0.0
        if job.size and job.work_done:
            per_row = job.work_done / max(job.rows_done, 1)  # work units a row, so far
            fraction = min(1.0, (job.work_done + per_row * running_rows) / job.size)
        elif job.size and job.speed and job.shards:
            # no shard ended yet: what the running ones should have done at the expected speed
            now, share = self.clock(), job.size / job.shards
            guess = sum(min(share, job.speed * (now - w.started)) for w in running)
            fraction = min(0.99, guess / job.size)
        elif job.shards:
            fraction = job.done / job.shards
        self.board.update(
            name,
            event=event,
            state="waiting" if job.state == "pending" else job.state,
            shards=job.shards or 0,
            done=job.done,
            rows=job.rows_done + running_rows,
            rejects=job.rejects_done + sum(w.rejected for w in running),
            fraction=fraction,
        )

    def _show_all(self) -> None:
        for name, job in self.jobs.items():
            if job.state == "running":
                self._show(name)

    def _metrics(self, push: str | None = None) -> str | None:
        """Rewrite metrics.prom from the records; push job `push`'s gauges when it ended."""
        snapshot = metrics.snapshot(self.runs, self.catalog.jobs)
        metrics.write_textfile(self.settings.data_dir / "batch" / "metrics.prom", snapshot)
        mine = [m for m in snapshot if m.job == push]
        return metrics.push_job(self.settings, mine[0], self.runs.host) if mine else None

    def _report(self, ok: bool) -> int:
        self.board.close()
        record = self.runs.get(self.run_id)
        for j in record.job_records:
            shards = record.shards_of(j.name)
            rows = sum(s.rows for s in shards)
            took = ((j.ended or 0) - (j.started or 0)) / 1000 if j.started else 0.0
            speed = f", {rows / took:,.0f} rows/s" if took > 0 and rows else ""
            self.board.say(
                f"{j.name}: {j.state}, {sum(s.state == 'done' for s in shards)}/{j.shards or '?'}"
                f" shards, {rows:,} rows, {sum(s.rejected for s in shards):,} rejects, "
                f"{duration_text(took)}{speed}" + (f" ({j.error})" if j.error else "")
            )
        if ok:
            self.board.say(f"run {self.run_id} succeeded")
            return 0
        self.board.say(f"run {self.run_id} failed")
        for s in record.shard_records:
            if s.state == "failed":
                self.board.say(f"  {s.job} shard {s.shard}: {s.error}\n    log: {s.log}")
        return 1


def _died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"worker died ({signal.Signals(-exitcode).name})"
    return f"worker exited with status {exitcode} without a result"


def _select(catalog: Catalog, names: Sequence[str]) -> list[BatchJob]:
    if not catalog.jobs:
        raise FeatureplaneError("the spec declares no batch_jobs")
    for name in names:
        if name not in catalog.jobs:
            close = difflib.get_close_matches(name, list(catalog.jobs), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FeatureplaneError(
                f"unknown batch job {name!r}{hint}; known: {', '.join(catalog.jobs)}"
            )
    return needed(catalog.jobs, names or list(catalog.jobs))


def run(
    settings: Settings,
    catalog: Catalog,
    jobs: list[str],
    at: int | None,
    *,
    workers: int,
    new: bool,
    plan_job: PlanFn | None = None,
    run_shard: ShardFn | None = None,
    out: TextIO | None = None,
) -> int:
    """Run `jobs` (none: all) and their dependencies, resuming the last unfinished run of
    the same jobs unless `new`; 0 when every job succeeded, 1 when one failed, 128+signal
    when stopped. `plan_job` and `run_shard` default to `featureplane.batch.shards`'."""
    if workers < 1:
        raise FeatureplaneError(f"--workers must be at least 1, got {workers}")
    todo = _select(catalog, jobs)
    if plan_job is None or run_shard is None:
        from featureplane.batch import shards

        plan_job = plan_job or shards.plan_job
        run_shard = run_shard or shards.run_shard
    job_set = ",".join(sorted(j.name for j in todo))
    runs = Runs.open(settings)
    board = JobBoard([j.name for j in todo], out)
    try:
        latest = None if new else runs.latest(job_set)
        if latest is not None and latest.state == "running":
            raise FeatureplaneError(
                f"run {latest.id} of these jobs is still running (pid {latest.pid} on "
                f"{latest.host}): wait for it, or stop it and run this again to resume it"
            )
        if latest is not None and latest.state != "succeeded":
            if at is None or at == latest.at_ms:
                runs.resume(latest.id)
                board.say(
                    f"resuming run {latest.id}: {latest.done} of {latest.total} shards done "
                    f"(at {_iso(latest.at_ms)})"
                )
                run_id, at_ms = latest.id, latest.at_ms
            else:
                board.say(
                    f"the last run {latest.id} of these jobs ({_iso(latest.at_ms)}) did not "
                    "finish; --at differs, so this is a new run"
                )
                latest = None
        if latest is None or latest.state == "succeeded":
            at_ms = at if at is not None else int(time.time() * 1000)
            run_id = runs.create(jobs, [(j.name, j.timeout) for j in todo], at_ms)
            board.say(f"run {run_id}: {', '.join(j.name for j in todo)} (at {_iso(at_ms)})")
        runner = _Runner(
            settings,
            catalog,
            runs,
            run_id,
            at_ms,
            workers=workers,
            plan_job=plan_job,
            run_shard=run_shard,
            board=board,
        )
        return runner.go()
    finally:
        runs.close()

"""`featureplane batch run`: batch jobs and their dependencies on this machine, resumable.

Jobs start in DAG order, each when the jobs in its `after` have succeeded in
this run; a job is planned (`plan_job`, at the speed measured by earlier runs)
when it starts, and its shard count is recorded, so a resumed run splits its
input exactly as the first attempt did. Shards run in worker processes
(`featureplane.batch.workers`; at most `workers` at once across jobs), each
logging to `<data_dir>/batch/logs/<run>/<job>.<I>.log`.

A failed shard fails its job (its running shards finish, no new one starts),
the job's dependents are skipped, independent jobs finish, and the run fails.
A job past its timeout has its shards stopped (SIGTERM, SIGKILL 10 s later).
SIGINT/SIGTERM stop every worker the same way and record the run as
interrupted; running the same command again resumes it, doing only the shards
not done.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from featureplane.batch import metrics
from featureplane.batch.progress import JobBoard
from featureplane.batch.runs import JobState, Runs
from featureplane.batch.status import run_summary
from featureplane.batch.workers import ShardFn, Worker, Workers, died
from featureplane.errors import FeatureplaneError
from featureplane.jobs import BatchJob, iso_time, select
from featureplane.settings import Settings, format_duration
from featureplane.spec import Catalog

if TYPE_CHECKING:
    from featureplane.batch.shards import JobPlan

__all__ = ["PlanFn", "ShardFn", "run"]

_SAVE_EVERY_S = 5.0
PlanFn = Callable[
    [Settings, Catalog, BatchJob, int, "float | None"], Coroutine[Any, Any, "JobPlan"]
]


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
        self.plan_job, self.board, self.clock = plan_job, board, clock
        logs = settings.data_dir / "batch" / "logs" / run_id
        self.pool = Workers(settings, catalog, at_ms, run_shard, logs, clock)
        self.signal: int | None = None
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
                if not self.pool.active:
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
            planning = self.plan_job(
                self.settings, self.catalog, job.spec, self.at_ms, self.runs.measured_speed(name)
            )
            try:
                plan = asyncio.run(planning)
            except FeatureplaneError as exc:
                self._end_job(name, "failed", f"cannot plan: {exc}")
                return
            job.shards, job.unit = plan.shards, plan.unit
            job.size, job.speed = plan.size, plan.speed
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
        # Pushed at the start too: the Pushgateway would otherwise keep the previous run's
        # next-run time, which is now, and call this run "not started" while it runs.
        pushed = self._metrics(push=name)
        if pushed:
            self.board.say(pushed)
        if not job.pending:
            self._end_job(name, "succeeded")

    def _launch(self) -> None:
        for name, job in self.jobs.items():
            while job.state == "running" and job.pending and len(self.pool.active) < self.workers:
                self._spawn(name, job, job.pending.popleft())

    def _spawn(self, name: str, job: _Job, shard: int) -> None:
        assert job.shards is not None
        w = self.pool.start(job.spec, (shard, job.shards))
        self.runs.start_shard(self.run_id, name, shard, w.process.pid, str(w.log))

    def _wait(self, timeout: float) -> None:
        for w in self.pool.wait(timeout):
            self._finish(w)
        now = self.clock()
        for w in self.pool.active:
            if now - w.saved >= _SAVE_EVERY_S:
                w.saved = now
                self.runs.shard_progress(self.run_id, w.job, w.shard, w.rows, w.rejected)
        self._show_all()

    def _finish(self, w: Worker) -> None:
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
            reason = w.stopping or w.error or died(w.process.exitcode)
            self.runs.end_shard(
                self.run_id, w.job, w.shard, "failed",
                rows=w.rows, rejected=w.rejected, seconds=seconds, error=reason,
            )  # fmt: skip
            job.pending.clear()  # the job failed: start none of its other shards
            if job.error is None:
                job.error = reason if w.stopping else f"shard {w.shard} failed: {reason}"
        if not job.pending and not any(a.job == w.job for a in self.pool.active):
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
                    job.error = f"timed out after {format_duration(job.spec.timeout)}"
                    job.pending.clear()
                    for w in self.pool.active:
                        if w.job == name and w.stopping is None:
                            self.pool.stop(w, job.error, now)
                if not any(w.job == name for w in self.pool.active):
                    self._end_job(name, "failed", job.error)
        self.pool.kill_overdue(now)

    def _stop_all(self, reason: str) -> None:
        now = self.clock()
        self.pool.stop_all(reason, now)
        while self.pool.active:
            self._wait(0.5)
            self.pool.kill_overdue(self.clock())

    # ------------------------------------------------------------ output

    def _show(self, name: str, *, event: bool = False) -> None:
        job = self.jobs[name]
        running = [w for w in self.pool.active if w.job == name]
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
        """Rewrite metrics.prom from the records; push job `push`'s gauges (at its start and
        end)."""
        snapshot = metrics.snapshot(self.runs, self.catalog.jobs)
        metrics.write_textfile(self.settings.data_dir / "batch" / "metrics.prom", snapshot)
        mine = [m for m in snapshot if m.job == push]
        return metrics.push_job(self.settings, mine[0], self.runs.host) if mine else None

    def _report(self, ok: bool) -> int:
        self.board.close()
        for line in run_summary(self.runs.get(self.run_id), ok):
            self.board.say(line)
        return 0 if ok else 1


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
    todo = select(catalog.jobs, jobs)
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
                    f"(at {iso_time(latest.at_ms)})"
                )
                run_id, at_ms = latest.id, latest.at_ms
            else:
                board.say(
                    f"the last run {latest.id} of these jobs ({iso_time(latest.at_ms)}) did not "
                    "finish; --at differs, so this is a new run"
                )
                latest = None
        if latest is None or latest.state == "succeeded":
            at_ms = at if at is not None else int(time.time() * 1000)
            run_id = runs.create(jobs, [(j.name, j.timeout) for j in todo], at_ms)
            board.say(f"run {run_id}: {', '.join(j.name for j in todo)} (at {iso_time(at_ms)})")
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

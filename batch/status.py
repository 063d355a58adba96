"""The batch runs as text for people: `featureplane batch status`, and what `batch run`
prints when it ends.

Read from the runs database that `batch run` writes (see `featureplane.batch.runs`);
a run left "running" by a process that is gone shows as interrupted, with the
command that resumes it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TextIO

import orjson

from featureplane.batch.runs import RunRecord, Runs
from featureplane.settings import Settings

__all__ = ["duration_text", "run_summary", "status"]


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def duration_text(seconds: float) -> str:
    """1.2s, 4m05s, 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _duration(run: RunRecord, now_ms: int) -> float:
    end = run.ended if run.ended is not None and run.state != "running" else now_ms
    return max(0, end - run.started) / 1000


def _run_json(run: RunRecord, now_ms: int) -> dict[str, object]:
    return {
        "id": run.id,
        "jobs": [j.name for j in run.job_records],
        "asked": list(run.jobs),
        "at": run.at_ms,
        "state": run.state,
        "shards_done": run.done,
        "shards": run.total,
        "rows": sum(s.rows for s in run.shard_records),
        "rejects": sum(s.rejected for s in run.shard_records),
        "started": run.started,
        "duration_s": round(_duration(run, now_ms), 3),
        "pid": run.pid,
        "host": run.host,
        "job_states": [asdict(j) for j in run.job_records],
        "failed": [asdict(s) for s in run.shard_records if s.state == "failed"],
    }


def _render(run: RunRecord, now_ms: int) -> list[str]:
    """One run's block of `batch status`."""
    rows = sum(s.rows for s in run.shard_records)
    rejects = sum(s.rejected for s in run.shard_records)
    lines = [
        f"{run.id}  {run.state}  shards {run.done}/{run.total}  rows {rows:,}  "
        f"rejects {rejects:,}  started {_when(run.started)}  "
        f"took {duration_text(_duration(run, now_ms))}  (at {_when(run.at_ms)})"
    ]
    for job in run.job_records:
        shards = run.shards_of(job.name)
        done = sum(s.state == "done" for s in shards)
        total = "?" if job.shards is None else str(job.shards)
        line = (
            f"  {job.name}: {job.state}, {done}/{total} shards, "
            f"{sum(s.rows for s in shards):,} rows"
        )
        if job.error:
            line += f" ({job.error})"
        lines.append(line)
        for s in shards:
            if s.state == "failed":
                lines.append(f"    shard {s.shard}/{total} failed: {s.error}  log: {s.log}")
    if run.state == "interrupted":
        lines.append(f"  rerun the same `featureplane batch run` to resume {run.id}")
    return lines


def run_summary(run: RunRecord, ok: bool) -> list[str]:
    """What `batch run` prints when it ends: a line a job, the outcome, the failed shards."""
    lines = []
    for j in run.job_records:
        shards = run.shards_of(j.name)
        rows = sum(s.rows for s in shards)
        took = ((j.ended or 0) - (j.started or 0)) / 1000 if j.started else 0.0
        speed = f", {rows / took:,.0f} rows/s" if took > 0 and rows else ""
        lines.append(
            f"{j.name}: {j.state}, {sum(s.state == 'done' for s in shards)}/{j.shards or '?'}"
            f" shards, {rows:,} rows, {sum(s.rejected for s in shards):,} rejects, "
            f"{duration_text(took)}{speed}" + (f" ({j.error})" if j.error else "")
        )
    if ok:
        return [*lines, f"run {run.id} succeeded"]
    lines.append(f"run {run.id} failed")
    for s in run.shard_records:
        if s.state == "failed":
            lines.append(f"  {s.job} shard {s.shard}: {s.error}\n    log: {s.log}")
    return lines


def status(settings: Settings, *, limit: int, as_json: bool, out: TextIO | None = None) -> int:
    """Print the newest `limit` runs on this machine, one block each (or JSON); 0."""
    out = out or sys.stdout
    path = settings.data_dir / "batch" / "runs.sqlite"
    runs = Runs(path) if path.exists() else None
    found = [] if runs is None else runs.recent(limit)
    now = int(time.time() * 1000)
    if as_json:
        out.write(orjson.dumps([_run_json(r, now) for r in found]).decode() + "\n")
    elif not found:
        out.write(f"no batch runs recorded in {settings.data_dir}\n")
    else:
        out.write("\n".join("\n".join(_render(r, now)) for r in found) + "\n")
    if runs is not None:
        runs.close()
    return 0

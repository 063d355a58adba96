"""`featureplane batch plan`: the batch DAG, each job's input, shards, estimate and why.

Jobs come in DAG order (dependencies first). Each is planned by
`shards.plan_job` as of the run's time, with the per-shard speed measured by
earlier runs on this machine when there is one. A job whose input is missing
is shown with its problem, the others are still planned, and the exit status
is 1. `--shard-list JOB` prints only that job's shards as a JSON list of
"I/N", which workflow engines fan out over, and nothing else on stdout (the
engine reads it as the step's result). It is the first step of the job's run
in the manifests of `batch render`, which set FEATUREPLANE_BATCH_JOB to JOB:
then, with a Pushgateway, it pushes the run's start (`metrics.push_started`).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO

import orjson

from featureplane.batch.shards import JobPlan, plan_job
from featureplane.errors import FeatureplaneError
from featureplane.jobs import BatchJob, cron_fires, iso_time, job_named, select
from featureplane.settings import Settings
from featureplane.spec import Catalog

__all__ = ["job_named", "plan_jobs", "run"]


def _speed(settings: Settings, name: str) -> float | None:
    from featureplane.batch.runs import measured_speed

    return measured_speed(settings, name)


async def plan_jobs(
    settings: Settings, catalog: Catalog, jobs: list[BatchJob], at_ms: int
) -> list[JobPlan | FeatureplaneError]:
    """Each job's plan, or the problem that stopped it (its input is missing, say)."""
    out: list[JobPlan | FeatureplaneError] = []
    for job in jobs:
        try:
            out.append(await plan_job(settings, catalog, job, at_ms, _speed(settings, job.name)))
        except FeatureplaneError as exc:
            out.append(exc)
    return out


def _seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    return f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _rate(plan: JobPlan) -> str:
    if plan.unit == "bytes":
        return f"{plan.speed / 1e6:.2f} MB/s"
    return f"{plan.speed:,.0f} records/s"


def _head(job: BatchJob, at_ms: int) -> dict[str, Any]:
    return {
        "name": job.name,
        "kind": job.kind,
        "schedule": job.schedule,
        "next_run": cron_fires(job.schedule, at_ms)[0] if job.schedule else None,
        "after": list(job.after),
        "parallelism": job.parallelism,
        "timeout_s": job.timeout / 1000,
    }


def _as_json(results: list[JobPlan | FeatureplaneError], jobs: list[BatchJob], at: int) -> bytes:
    entries = []
    for job, r in zip(jobs, results, strict=True):
        entry = _head(job, at)
        if isinstance(r, FeatureplaneError):
            entry["error"] = str(r)
        else:
            entry |= {
                "shards": r.shards,
                "shard_list": [f"{i}/{r.shards}" for i in range(r.shards)],
                "size": r.size,
                "unit": r.unit,
                "inputs": r.inputs,
                "speed": r.speed,
                "speed_measured": r.speed_measured,
                "estimate_s": round(r.estimate_s, 3),
                "reason": r.reason,
            }
        entries.append(entry)
    return orjson.dumps({"at": at, "jobs": entries}, option=orjson.OPT_INDENT_2)


def _as_text(results: list[JobPlan | FeatureplaneError], jobs: list[BatchJob], at: int) -> str:
    lines = [f"batch plan at {iso_time(at)}: {len(jobs)} job(s), dependencies first", ""]
    width = max(len(j.name) for j in jobs)
    for job, r in zip(jobs, results, strict=True):
        when = (
            f"schedule {job.schedule!r} (next {iso_time(cron_fires(job.schedule, at)[0])})"
            if job.schedule
            else "no schedule"
        )
        after = f", after {', '.join(job.after)}" if job.after else ""
        lines.append(f"{job.name:<{width}}  {job.kind:<8}  {when}{after}")
        if isinstance(r, FeatureplaneError):
            lines.append(f"  problem   {r}")
        else:
            measured = "measured" if r.speed_measured else "default, not measured yet"
            lines += [
                f"  input     {r.inputs}",
                f"  shards    {r.shards}: {r.reason}",
                f"  estimate  {_seconds(r.estimate_s)} at {_rate(r)} per shard ({measured})",
            ]
    return "\n".join(lines) + "\n"


def run(
    settings: Settings,
    catalog: Catalog,
    jobs: list[str],
    at: int | None,
    *,
    as_json: bool,
    shard_list: str | None,
    out: TextIO | None = None,
) -> int:
    """Plan the named jobs and their dependencies (all jobs when none are named) and print
    the plan; 0, or 1 when a job could not be planned."""
    out = out or sys.stdout
    at_ms = at if at is not None else time.time_ns() // 1_000_000
    if shard_list is not None:
        job = job_named(catalog.jobs, shard_list)
        plan = asyncio.run(plan_job(settings, catalog, job, at_ms, _speed(settings, job.name)))
        out.write(orjson.dumps([f"{i}/{plan.shards}" for i in range(plan.shards)]).decode() + "\n")
        if settings.batch_job == job.name:  # an engine's run, not someone looking
            from featureplane.batch.metrics import push_started

            if warning := push_started(settings, job, at_ms, plan.shards):
                print(warning, file=sys.stderr)
        return 0
    selected = select(catalog.jobs, jobs)
    results = asyncio.run(plan_jobs(settings, catalog, selected, at_ms))
    out.write(
        _as_json(results, selected, at_ms).decode() + "\n"
        if as_json
        else _as_text(results, selected, at_ms)
    )
    failed = [
        j.name for j, r in zip(selected, results, strict=True) if isinstance(r, FeatureplaneError)
    ]
    if failed:
        print(f"could not plan: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0

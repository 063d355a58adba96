"""Prometheus metrics of batch runs: the local runner's file and pushes, and shard pods' pushes.

The runner writes one gauge set per job (label `job`, the batch job name) to
`<data_dir>/batch/metrics.prom` in the node_exporter textfile format, atomically,
on every state change, and pushes a job's set to the Pushgateway when the job
ends. A shard pod (`load`/`backfill` with FEATUREPLANE_BATCH_JOB) pushes its own
per-shard gauges when it ends, so a short-lived pod loses none.

Pushgateway grouping keys carry the batch job's name as `job`: the Pushgateway
sets every pushed series' `job` to the grouping key's, so a key of one fixed
`job` would fold every batch job into one series (and the Pushgateway refuses
such a push with 400). Runner: {job=<batch job>, instance=<host>}; shard:
{job=<batch job>, shard=<I>}. Scrape the Pushgateway (and a textfile collector)
with `honor_labels: true` so that `job` stays the batch job's name.

A Pushgateway that does not answer costs one warning line, never the run.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile

from featureplane.batch.runs import Runs
from featureplane.jobs import BatchJob, cron_fires, cron_period_ms
from featureplane.settings import Settings

__all__ = [
    "PUSH_TIMEOUT_S",
    "STATES",
    "JobMetrics",
    "job_metrics",
    "push_job",
    "push_shard",
    "registry_of",
    "snapshot",
    "write_textfile",
]

log = logging.getLogger(__name__)
STATES = ("running", "succeeded", "failed")
"""The values of `featureplane_batch_run_state`'s `state` label."""
PUSH_TIMEOUT_S = 5.0
"""A push waits this long for the Pushgateway, then is a warning."""


@dataclass(frozen=True, slots=True)
class JobMetrics:
    """One job's latest run, as its gauges show it (times in epoch seconds)."""

    job: str
    state: str
    """running, succeeded or failed (an interrupted run shows as failed)."""
    started_s: float | None
    timeout_s: float
    shards: int
    shards_done: int
    rows: int
    rejects: int
    last_success_s: float | None
    next_run_s: float | None
    """The schedule's next fire after the run's time; None for an unscheduled job."""
    period_s: float | None


def job_metrics(
    job: BatchJob,
    at_ms: int,
    *,
    state: str,
    started_ms: int | None,
    shards: int,
    shards_done: int,
    rows: int,
    rejects: int,
    last_success_ms: int | None,
) -> JobMetrics:
    """A job's gauges; next run and period from its schedule, counted from `at_ms`."""
    next_s = period_s = None
    if job.schedule:
        next_s = cron_fires(job.schedule, at_ms)[0] / 1000
        period_s = cron_period_ms(job.schedule, at_ms) / 1000
    return JobMetrics(
        job=job.name,
        state=state if state in STATES else "failed",
        started_s=None if started_ms is None else started_ms / 1000,
        timeout_s=job.timeout / 1000,
        shards=shards,
        shards_done=shards_done,
        rows=rows,
        rejects=rejects,
        last_success_s=None if last_success_ms is None else last_success_ms / 1000,
        next_run_s=next_s,
        period_s=period_s,
    )


def registry_of(jobs: Iterable[JobMetrics]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=True)

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ("job",)) -> Gauge:
        return Gauge(f"featureplane_batch_{name}", doc, labels, registry=reg)

    state = gauge("run_state", "1 for the state of the job's latest run", ("job", "state"))
    start = gauge("run_start_timestamp_seconds", "When the job's latest run started")
    timeout = gauge("run_timeout_seconds", "The job's timeout")
    shards = gauge("shards", "Shards of the job's latest run")
    done = gauge("shards_done", "Shards done in the job's latest run")
    rows = gauge("rows_written", "Rows (or records) written by the job's latest run")
    rejects = gauge("rejects", "Rows rejected (or records malformed) in the job's latest run")
    success = gauge("last_success_timestamp_seconds", "When the job last succeeded")
    next_run = gauge("next_run_timestamp_seconds", "The schedule's next fire after the run")
    period = gauge("period_seconds", "The longest gap between the schedule's fires")
    for m in jobs:
        for s in STATES:
            state.labels(m.job, s).set(1 if m.state == s else 0)
        if m.started_s is not None:
            start.labels(m.job).set(m.started_s)
        timeout.labels(m.job).set(m.timeout_s)
        shards.labels(m.job).set(m.shards)
        done.labels(m.job).set(m.shards_done)
        rows.labels(m.job).set(m.rows)
        rejects.labels(m.job).set(m.rejects)
        if m.last_success_s is not None:
            success.labels(m.job).set(m.last_success_s)
        if m.next_run_s is not None and m.period_s is not None:
            next_run.labels(m.job).set(m.next_run_s)
            period.labels(m.job).set(m.period_s)
    return reg


def write_textfile(path: Path, jobs: Iterable[JobMetrics]) -> None:
    """Replace `path` atomically (a temp file renamed over it): a collector never reads
    half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry_of(jobs))


def _push(url: str, registry: CollectorRegistry, key: Mapping[str, str]) -> str | None:
    """PUT the registry under the grouping key; the warning text when it failed."""
    grouping = dict(key)
    job = grouping.pop("job")
    try:
        push_to_gateway(url, job, registry, grouping_key=grouping, timeout=PUSH_TIMEOUT_S)
    except Exception as exc:  # any failure to push is a warning, by design
        return f"warning: could not push metrics to the Pushgateway at {url}: {exc}"
    return None


def push_job(settings: Settings, m: JobMetrics, host: str | None = None) -> str | None:
    """Push one job's gauges when `pushgateway_url` is set; the warning text, if any."""
    if not settings.pushgateway_url:
        return None
    key = {"job": m.job, "instance": host or socket.gethostname()}
    return _push(settings.pushgateway_url, registry_of([m]), key)


class _Counts(Protocol):
    @property
    def done(self) -> int: ...
    @property
    def rejected(self) -> int: ...


def push_shard(
    settings: Settings,
    shard: tuple[int, int],
    result: _Counts | None,
    error: str | None = None,
    *,
    name: str = "",
) -> None:
    """What a shard pushes when it ends, OK or not (`error`): its rows, rejects, done (1 once
    finished OK) and the push time, labelled job=settings.batch_job (else `name`, e.g. the
    group or topic) and shard=I. Nothing without `pushgateway_url`; a failed push is a
    warning line on stderr."""
    if not settings.pushgateway_url:
        return
    job = settings.batch_job or name or "featureplane"
    reg = CollectorRegistry(auto_describe=True)
    labels = ("job", "shard")
    values = {
        "rows_written": 0 if result is None else result.done,
        "rejects": 0 if result is None else result.rejected,
        "done": 1 if error is None and result is not None else 0,
        "last_push_timestamp_seconds": time.time(),
    }
    docs = {
        "rows_written": "Rows (or records) the shard wrote",
        "rejects": "Rows rejected (or records malformed) in the shard",
        "done": "1 once the shard finished OK",
        "last_push_timestamp_seconds": "When the shard last pushed",
    }
    for key, value in values.items():
        g = Gauge(f"featureplane_batch_shard_{key}", docs[key], labels, registry=reg)
        g.labels(job, str(shard[0])).set(value)
    warning = _push(settings.pushgateway_url, reg, {"job": job, "shard": str(shard[0])})
    if warning:
        print(warning, file=sys.stderr)


def snapshot(runs: Runs, jobs: Mapping[str, BatchJob]) -> list[JobMetrics]:
    """Every spec job's gauges from its latest recorded run (jobs never run: none), so that
    a run of some jobs does not drop the others' from the file."""
    out: list[JobMetrics] = []
    for name, job in jobs.items():
        latest = runs.latest_with(name)
        if latest is None:
            continue
        record = next(j for j in latest.job_records if j.name == name)
        shards = latest.shards_of(name)
        state = {"pending": "running", "skipped": "failed"}.get(record.state, record.state)
        if latest.state == "interrupted" and state == "running":
            state = "failed"
        out.append(
            job_metrics(
                job,
                latest.at_ms,
                state=state,
                started_ms=record.started or latest.started,
                shards=record.shards or 0,
                shards_done=sum(s.state == "done" for s in shards),
                rows=sum(s.rows for s in shards),
                rejects=sum(s.rejected for s in shards),
                last_success_ms=runs.last_success(name),
            )
        )
    return out

"""Prometheus metrics of batch runs: the local runner's file and pushes, and shard pods' pushes.

The runner writes one gauge set per job (label `job`, the batch job name) to
`<data_dir>/batch/metrics.prom` in the node_exporter textfile format, atomically,
on every state change, and pushes a job's set to the Pushgateway when the job
ends. A shard pod (`load`/`backfill` with FEATUREPLANE_BATCH_JOB) pushes its own
per-shard gauges when it ends, so a short-lived pod loses none.

A job run by a workflow engine (the manifests of `batch render`) gets the same
job-level gauges from two pushes, grouping key {job=<batch job>, instance=argo}:
`push_started` when its plan step runs (state running, start, timeout, shards,
schedule) and `report` when it ends (`featureplane batch report`: the state,
the shards' rows, rejects and shards done summed from their own pushes, and on
success the time). Both POST, which replaces only the metric families pushed,
so the start survives the end and the last success survives a failure.

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
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    push_to_gateway,
    pushadd_to_gateway,
    write_to_textfile,
)
from prometheus_client.parser import text_string_to_metric_families

from featureplane.batch.runs import Runs
from featureplane.jobs import BatchJob, cron_fires, cron_period_ms
from featureplane.settings import Settings

__all__ = [
    "ENGINE_INSTANCE",
    "PUSH_TIMEOUT_S",
    "STATES",
    "JobMetrics",
    "job_metrics",
    "push_job",
    "push_shard",
    "push_started",
    "registry_of",
    "report",
    "snapshot",
    "write_textfile",
]

log = logging.getLogger(__name__)
STATES = ("running", "succeeded", "failed")
"""The values of `featureplane_batch_run_state`'s `state` label."""
PUSH_TIMEOUT_S = 5.0
"""A push waits this long for the Pushgateway, then is a warning."""
ENGINE_INSTANCE = "argo"
"""The `instance` of the gauges of jobs run by a workflow engine (not by `batch run`)."""
_DOCS = {
    "run_state": "1 for the state of the job's latest run",
    "run_start_timestamp_seconds": "When the job's latest run started",
    "run_timeout_seconds": "The job's timeout",
    "shards": "Shards of the job's latest run",
    "shards_done": "Shards done in the job's latest run",
    "rows_written": "Rows (or records) written by the job's latest run",
    "rejects": "Rows rejected (or records malformed) in the job's latest run",
    "last_success_timestamp_seconds": "When the job last succeeded",
    "next_run_timestamp_seconds": "The schedule's next fire after the run",
    "period_seconds": "The longest gap between the schedule's fires",
}


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

    def gauge(name: str, labels: tuple[str, ...] = ("job",)) -> Gauge:
        return Gauge(f"featureplane_batch_{name}", _DOCS[name], labels, registry=reg)

    state = gauge("run_state", ("job", "state"))
    start = gauge("run_start_timestamp_seconds")
    timeout = gauge("run_timeout_seconds")
    shards = gauge("shards")
    done = gauge("shards_done")
    rows = gauge("rows_written")
    rejects = gauge("rejects")
    success = gauge("last_success_timestamp_seconds")
    next_run = gauge("next_run_timestamp_seconds")
    period = gauge("period_seconds")
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


def _push(
    url: str, registry: CollectorRegistry, key: Mapping[str, str], *, add: bool = False
) -> str | None:
    """PUT the registry under the grouping key (the whole group replaced), or with `add`
    POST it (only the metric families pushed replaced); the warning text when it failed."""
    grouping = dict(key)
    job = grouping.pop("job")
    send = pushadd_to_gateway if add else push_to_gateway
    try:
        send(url, job, registry, grouping_key=grouping, timeout=PUSH_TIMEOUT_S)
    except Exception as exc:  # any failure to push is a warning, by design
        return f"warning: could not push metrics to the Pushgateway at {url}: {exc}"
    return None


def push_job(settings: Settings, m: JobMetrics, host: str | None = None) -> str | None:
    """Push one job's gauges when `pushgateway_url` is set; the warning text, if any."""
    if not settings.pushgateway_url:
        return None
    key = {"job": m.job, "instance": host or socket.gethostname()}
    return _push(settings.pushgateway_url, registry_of([m]), key)


def _gauges(job: str, state: str | None, values: Mapping[str, float]) -> CollectorRegistry:
    """A registry of only these job-level gauges (a POST replaces only what it carries)."""
    reg = CollectorRegistry(auto_describe=True)
    if state is not None:
        g = Gauge(
            "featureplane_batch_run_state", _DOCS["run_state"], ("job", "state"), registry=reg
        )
        for s in STATES:
            g.labels(job, s).set(1 if s == state else 0)
    for name, value in values.items():
        gauge = Gauge(f"featureplane_batch_{name}", _DOCS[name], ("job",), registry=reg)
        gauge.labels(job).set(value)
    return reg


def _schedule(job: BatchJob, at_ms: int) -> dict[str, float]:
    """The schedule's next fire after the run's time and its period; none unscheduled."""
    if not job.schedule:
        return {}
    return {
        "next_run_timestamp_seconds": cron_fires(job.schedule, at_ms)[0] / 1000,
        "period_seconds": cron_period_ms(job.schedule, at_ms) / 1000,
    }


def push_started(
    settings: Settings, job: BatchJob, at_ms: int, shards: int, now_ms: int | None = None
) -> str | None:
    """What an engine's run of `job` pushes when its plan step has planned `shards`: state
    running, start (now), timeout, shards, nothing done yet, and the schedule's next fire
    after `at_ms` and period. Never the last success, which this POST so keeps. The
    warning text when the push failed; nothing without `pushgateway_url`."""
    if not settings.pushgateway_url:
        return None
    now = time.time() * 1000 if now_ms is None else now_ms
    values = {
        "run_start_timestamp_seconds": now / 1000,
        "run_timeout_seconds": job.timeout / 1000,
        "shards": shards,
        "shards_done": 0,
        "rows_written": 0,
        "rejects": 0,
    }
    key = {"job": job.name, "instance": ENGINE_INSTANCE}
    values |= _schedule(job, at_ms)
    return _push(settings.pushgateway_url, _gauges(job.name, "running", values), key, add=True)


def _shard_sums(url: str, job: str, since_s: float) -> dict[str, float]:
    """The job's shard gauges on the Pushgateway summed over the shards that pushed since
    `since_s` (earlier pushes are an earlier run's: a run with fewer shards leaves them)."""
    page = f"{(url if '://' in url else f'http://{url}').rstrip('/')}/metrics"
    with urllib.request.urlopen(page, timeout=PUSH_TIMEOUT_S) as resp:  # noqa: S310  # configured
        text = resp.read().decode()
    by_shard: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("featureplane_batch_shard_") and s.labels.get("job") == job:
                name = s.name.removeprefix("featureplane_batch_shard_")
                by_shard.setdefault(s.labels.get("shard", ""), {})[name] = s.value
    recent = [v for v in by_shard.values() if v.get("last_push_timestamp_seconds", 0) >= since_s]
    return {
        "shards_done": sum(v.get("done", 0) for v in recent),
        "rows_written": sum(v.get("rows_written", 0) for v in recent),
        "rejects": sum(v.get("rejects", 0) for v in recent),
    }


def report(
    settings: Settings, job: BatchJob, at_ms: int, state: str, now_ms: int | None = None
) -> int:
    """`featureplane batch report`: push the end of an engine's run of `job` (as of `at_ms`)
    in `state`, succeeded or failed. Pushes the state, the rows, rejects and shards done its
    shards pushed since `at_ms`, the schedule's next fire after `at_ms`, and on success the
    time as the last success; a Pushgateway that does not answer is a warning. 0 for
    succeeded, 1 for failed: the engine's task that reports a failure fails too, so the
    workflow still ends failed."""
    if state not in ("succeeded", "failed"):
        raise ValueError(f"state {state!r}: expected succeeded or failed")
    url = settings.pushgateway_url
    if not url:
        print(
            f"batch job {job.name}: {state} (no pushgateway_url: nothing pushed)", file=sys.stderr
        )
    else:
        # the schedule again: a run whose plan step failed pushed no start, yet it ran
        values: dict[str, float] = _schedule(job, at_ms)
        try:
            values |= _shard_sums(url, job.name, at_ms / 1000)
        except Exception as exc:  # the counts are a nicety: the state is still pushed
            print(f"warning: could not read the shards' counts from {url}: {exc}", file=sys.stderr)
        if state == "succeeded":
            now = time.time() * 1000 if now_ms is None else now_ms
            values["last_success_timestamp_seconds"] = now / 1000
        key = {"job": job.name, "instance": ENGINE_INSTANCE}
        warning = _push(url, _gauges(job.name, state, values), key, add=True)
        if warning:
            print(warning, file=sys.stderr)
    if state == "failed":
        print(f"batch job {job.name} failed", file=sys.stderr)
        return 1
    return 0


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
    finished OK) and the push time, labelled job=settings.batch_job (else `name`:
    `load_<group>` or `backfill_<topic>`) and shard=I. Nothing without `pushgateway_url`;
    a failed push is a warning line on stderr."""
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

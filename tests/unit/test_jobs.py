"""Batch jobs in the spec: what loads, every problem with file:line, times, cron and the DAG."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from featureplane.errors import SpecError
from featureplane.jobs import (
    cron_fires,
    cron_latest,
    cron_period_ms,
    needed,
    resolve_source,
    resolve_time,
    schedule_runs,
)
from featureplane.spec import load_catalog

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DAY = 86_400_000

BASE = """\
feature_groups:
  - {name: g, entity: u, kind: latest, features: [{name: a, type: int}]}
  - {name: h, entity: u, kind: latest, features: [{name: a, type: int}]}
  - {name: od, entity: u, kind: latest, on_demand: "m:f", features: [{name: a, type: int}]}
ingestion:
  - {name: r, topic: t, event_type: e, group: g, id: u, features: {a: a}}
"""


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def _problems(tmp_path: Path, jobs: str) -> list[str]:
    spec = tmp_path / "s.yaml"
    spec.write_text(BASE + "batch_jobs:\n" + jobs)
    with pytest.raises(SpecError) as err:
        load_catalog(spec)
    return [str(p).removeprefix(f"{spec}:") for p in err.value.problems]


def test_the_example_jobs_load_in_dag_order() -> None:
    catalog = load_catalog(EXAMPLES)
    assert list(catalog.jobs) == [
        "article_stats_daily",
        "article_embeddings_daily",
        "recent_clicks_rebuild",
    ]
    rebuild = catalog.jobs["recent_clicks_rebuild"]
    assert rebuild.kind == "backfill" and rebuild.backfill is not None
    assert rebuild.backfill.from_ == "-1d" and rebuild.timeout == 2 * 3_600_000
    assert catalog.jobs["article_stats_daily"].parallelism == "auto"
    assert [j.name for j in needed(catalog.jobs, ["recent_clicks_rebuild"])] == list(catalog.jobs)
    assert [j.name for j in needed(catalog.jobs, ["article_embeddings_daily"])] == [
        "article_embeddings_daily"
    ]
    # The unscheduled rebuild comes after both daily loads, so it is part of their run.
    runs = schedule_runs(catalog.jobs)
    assert {cron: [j.name for j in jobs] for cron, jobs in runs.items()} == {
        "30 3 * * *": list(catalog.jobs)
    }


def test_every_job_problem_is_located(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        """\
  - name: a
    load: {group: nope, source: "x/{date}/*.jsonl"}
    schedule: "61 * * * *"
    after: [b]
  - name: b
    backfill: {topic: tt, from: -1d}
    after: [a, c]
  - name: c2
    load: {group: g, source: "x.parquet"}
    backfill: {topic: t, from: -1d}
  - name: d
    load: {group: od, source: "dump.csv"}
  - name: e
    load: {group: g, source: "s3://b/{day}/x.jsonl"}
    parallelism: 0
    timeout: 2 hours
  - name: f
    backfill: {topic: t, from: yesterday, to: "2026-01-01T00:00:00", groups: [h, zz]}
  - name: a
    load: {group: g, source: x.jsonl}
""",
    )
    spec = tmp_path / "s.yaml"
    assert problems == [
        "10: batch_jobs[0].schedule: bad cron line '61 * * * *': Bad minute (expected 5 fields: "
        'minute hour day month weekday, e.g. "30 3 * * *")',
        "13: batch_jobs[1].backfill.topic: no ingestion rule reads 'tt' (did you mean 't'?)",
        "14: batch_jobs[1].after[1]: unknown job 'c' (did you mean 'c2'?)",
        "14: batch_jobs[1].after[0]: cycle: a -> b -> a",
        "15: batch_jobs[2]: a job is either a load or a backfill: give exactly one of them",
        "19: batch_jobs[3].load: cannot tell the format of 'dump.csv': end it in .parquet or "
        ".jsonl, or set format: jsonl or parquet",
        "21: batch_jobs[4].load.source: unknown placeholder {day} (the one known is {date})",
        "22: batch_jobs[4].parallelism: parallelism must be auto or a number from 1 to 1000, got 0",
        "23: batch_jobs[4].timeout: bad duration '2 hours' (expected a number and ms, s, m, h "
        "or d, e.g. 30s)",
        "25: batch_jobs[5].backfill.from: bad time 'yesterday' (expected now, -7d, epoch ms or "
        "ISO 8601 with a zone, e.g. 2026-11-01T00:00:00Z)",
        "25: batch_jobs[5].backfill.to: time '2026-01-01T00:00:00' has no timezone: add Z or "
        "+09:00",
        f"26: batch_jobs[6].name: duplicate batch job 'a' (first at {spec}:8)",
    ]
    # The load group and the on-demand group of otherwise valid jobs:
    more = _problems(
        tmp_path,
        """\
  - {name: a, load: {group: nope, source: x.jsonl}}
  - {name: b, load: {group: od, source: x.jsonl}}
  - {name: c, backfill: {topic: t, from: -1d, groups: [h, zz]}}
""",
    )
    assert more == [
        "8: batch_jobs[0].load.group: unknown group 'nope'",
        "9: batch_jobs[1].load.group: group 'od' is on-demand: it is never stored",
        "10: batch_jobs[2].backfill.groups[1]: unknown group 'zz'",
        "10: batch_jobs[2].backfill.groups[0]: topic 't' does not feed group 'h'",
    ]


def test_a_cycle_through_three_jobs_is_one_problem(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        """\
  - {name: a, load: {group: g, source: x.jsonl}, after: [c]}
  - {name: b, load: {group: g, source: x.jsonl}, after: [a]}
  - {name: c, load: {group: g, source: x.jsonl}, after: [b]}
  - {name: d, load: {group: g, source: x.jsonl}, after: [d]}
""",
    )
    # Reported once, at the `after` entry that closes the cycle.
    assert problems == [
        "9: batch_jobs[1].after[0]: cycle: a -> c -> b -> a",
        "11: batch_jobs[3].after[0]: cycle: d -> d",
    ]


def test_times_relative_to_the_run() -> None:
    at = _ms("2026-11-30T03:30:00+00:00")
    assert resolve_time("now", at) == at
    assert resolve_time("-7d", at) == at - 7 * DAY
    assert resolve_time("-90m", at) == at - 90 * 60_000
    assert resolve_time("2026-11-01T00:00:00Z", at) == _ms("2026-11-01T00:00:00+00:00")
    assert resolve_time("1700000000000", at) == 1_700_000_000_000
    assert resolve_time(1_700_000_000_000, at) == 1_700_000_000_000
    for bad in ("+1d", "-1w", "tomorrow", ""):
        with pytest.raises(ValueError, match="bad time"):
            resolve_time(bad, at)
    assert resolve_source("s3://b/{date}/*.parquet", at) == "s3://b/2026-11-30/*.parquet"
    assert resolve_source("s3://b/{date}/*.parquet", at - 4 * 3_600_000) == (
        "s3://b/2026-11-29/*.parquet"
    )


def test_cron_fires_latest_and_period() -> None:
    at = _ms("2026-11-30T03:30:00+00:00")
    assert cron_fires("30 3 * * *", at, 2) == [at + DAY, at + 2 * DAY]
    assert cron_latest("30 3 * * *", at) == at  # a fire exactly at `at` is the latest
    assert cron_latest("30 3 * * *", at - 1) == at - DAY
    assert cron_period_ms("30 3 * * *", at) == DAY
    assert cron_period_ms("0 4 * * 1", at) == 7 * DAY
    assert cron_period_ms("0 */6 * * *", at) == 6 * 3_600_000
    with pytest.raises(ValueError, match="bad cron line"):
        cron_latest("nope", at)
    # hostile or impossible lines are refused at once, never stepped through for years
    for bad in ("*/0 * * * *", "0 0 31 2 *", "1-1000000000 * * * *", "* " * 5000, "\x00 * * * *"):
        with pytest.raises(ValueError, match="bad cron line"):
            cron_latest(bad, at)
    assert cron_period_ms("0 0 29 2 *", at) == 4 * 365 * DAY + DAY  # leap days only


def test_schedule_runs_take_unscheduled_dependents_and_their_needs(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(
        BASE
        + """\
batch_jobs:
  - {name: hourly, load: {group: g, source: x.jsonl}, schedule: "0 * * * *"}
  - {name: daily, load: {group: g, source: x.jsonl}, schedule: "0 3 * * *"}
  - {name: manual, load: {group: h, source: x.jsonl}}
  - {name: after_daily, backfill: {topic: t, from: -1d}, after: [daily, manual]}
  - {name: after_both, load: {group: g, source: x.jsonl}, after: [hourly, after_daily]}
  - {name: own_schedule, load: {group: g, source: x.jsonl}, after: [hourly],
     schedule: "0 5 * * *"}
"""
    )
    jobs = load_catalog(spec).jobs
    runs = {cron: [j.name for j in js] for cron, js in schedule_runs(jobs).items()}
    assert runs == {
        "0 * * * *": ["hourly", "daily", "manual", "after_daily", "after_both"],
        "0 3 * * *": ["hourly", "daily", "manual", "after_daily", "after_both"],
        "0 5 * * *": ["hourly", "own_schedule"],
    }
    assert datetime.fromtimestamp(cron_fires("0 5 * * *", 0)[0] / 1000, UTC).hour == 5

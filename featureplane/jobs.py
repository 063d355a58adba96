"""Batch jobs as the spec declares them (`batch_jobs:`), and the DAG they make.

A job is a `load` (files into one group) or a `backfill` (a topic's time range
reprocessed), with an optional cron `schedule` (UTC), `after:` dependencies,
`parallelism` and `timeout`. A run has a time `at` (its scheduled time, or now):
`{date}` in a source is `at`'s UTC day, and a backfill's relative times
(`-7d`, `now`) count from `at`, so every shard of one run, on any machine,
reads exactly the same input.

The checks across jobs (unknown groups and jobs, cycles) are in
`featureplane.spec`, with the file and line of each problem.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import pydantic
from cronsim import CronSim, CronSimError
from pydantic import Field, PlainValidator

from featureplane._spec_fields import Name, SpecDuration, SpecModel, parse_duration
from featureplane.errors import FeatureplaneError, quote

__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "BackfillSource",
    "BatchJob",
    "LoadSource",
    "cron_fires",
    "cron_latest",
    "cron_period_ms",
    "format_of",
    "iso_time",
    "job_named",
    "needed",
    "resolve_source",
    "resolve_time",
    "schedule_runs",
    "select",
]

DEFAULT_TIMEOUT_MS = 6 * 3_600_000
"""A job's `timeout` when its spec gives none: a run longer than this fails and alerts."""
_RELATIVE = re.compile(r"-(\d+(?:ms|s|m|h|d))")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_FORMATS: dict[str, Literal["jsonl", "parquet"]] = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


def resolve_time(expr: str | int, at_ms: int) -> int:
    """A spec time -> epoch ms: `now`, `-7d` (before `at_ms`), ISO 8601 with a zone, epoch ms."""
    if isinstance(expr, int) and not isinstance(expr, bool):
        return expr
    text = str(expr).strip()
    if text == "now":
        return at_ms
    if m := _RELATIVE.fullmatch(text):
        return at_ms - parse_duration(m.group(1))
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        when = None
    if when is not None and when.tzinfo is None:
        raise ValueError(f"time {quote(expr)} has no timezone: add Z or +09:00")
    if when is None:
        raise ValueError(
            f"bad time {quote(expr)} (expected now, -7d, epoch ms or ISO 8601 with a zone, "
            "e.g. 2026-11-01T00:00:00Z)"
        )
    return int(when.timestamp() * 1000)


def _time(value: Any) -> str | int:
    resolve_time(value, 0)
    return value  # type: ignore[no-any-return]  # checked just above


def _cron(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"schedule must be a cron line in quotes, got {quote(value)}")
    try:
        CronSim(value, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ValueError(
            f"bad cron line {quote(value)}: {exc} (expected 5 fields: minute hour day "
            'month weekday, e.g. "30 3 * * *")'
        ) from None
    return value


def _parallelism(value: Any) -> Literal["auto"] | int:
    if value == "auto" or (type(value) is int and 1 <= value <= 1000):
        return value  # type: ignore[no-any-return]  # checked just above
    raise ValueError(f"parallelism must be auto or a number from 1 to 1000, got {quote(value)}")


TimeExpr = Annotated[str | int, PlainValidator(_time)]
Cron = Annotated[str, PlainValidator(_cron)]


def format_of(source: str) -> Literal["jsonl", "parquet"] | None:
    """A source's format by its extension, glob characters and all; None when it has none."""
    for ext, fmt in _FORMATS.items():
        if source.endswith(ext):
            return fmt
    return None


class LoadSource(SpecModel):
    """A file load: every file the source matches, into one group."""

    group: Name
    """The group loaded."""
    source: str = Field(min_length=1, max_length=1024)
    """A local path or s3://bucket/key, a glob; `{date}` = the run's UTC day, YYYY-MM-DD."""
    format: Literal["jsonl", "parquet"] | None = None
    """jsonl or parquet; absent = by the source's extension."""

    @pydantic.field_validator("source")
    @classmethod
    def _placeholders(cls, source: str) -> str:
        for name in _PLACEHOLDER.findall(source):
            if name != "date":
                raise ValueError(f"unknown placeholder {{{name}}} (the one known is {{date}})")
        return source

    @pydantic.model_validator(mode="after")
    def _known_format(self) -> LoadSource:
        if self.format is None and format_of(self.source) is None:
            raise ValueError(
                f"cannot tell the format of {quote(self.source)}: end it in .parquet or "
                ".jsonl, or set format: jsonl or parquet"
            )
        return self

    @property
    def file_format(self) -> Literal["jsonl", "parquet"]:
        fmt = self.format or format_of(self.source)
        assert fmt is not None  # the validator above
        return fmt


class BackfillSource(SpecModel):
    """A backfill: a topic's records in a time range, through the ingestion rules."""

    model_config = SpecModel.model_config | {"populate_by_name": True}

    topic: str = Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")
    """The event topic reprocessed."""
    from_: TimeExpr = Field(alias="from")
    """First event time: -7d (before the run's time), now, ISO 8601 or epoch ms."""
    to: TimeExpr = "now"
    """Last event time, inclusive, in the same forms."""
    groups: tuple[Name, ...] | None = None
    """Only these groups; absent = every group the topic feeds."""


class BatchJob(SpecModel):
    """One batch job of the spec."""

    name: Name
    """Job name, unique in the catalog."""
    load: LoadSource | None = None
    backfill: BackfillSource | None = None
    schedule: Cron | None = None
    """Cron line, UTC; absent = run when asked, or after the jobs it depends on."""
    after: tuple[Name, ...] = ()
    """Jobs that must succeed first, in the same run."""
    parallelism: Annotated[Literal["auto"] | int, PlainValidator(_parallelism)] = "auto"
    """Shards run at once: a number, or auto = from the input's size and measured speed."""
    timeout: SpecDuration = DEFAULT_TIMEOUT_MS
    """A run longer than this fails and alerts."""

    @pydantic.model_validator(mode="after")
    def _one_kind(self) -> BatchJob:
        if (self.load is None) == (self.backfill is None):
            raise ValueError("a job is either a load or a backfill: give exactly one of them")
        return self

    @property
    def kind(self) -> Literal["load", "backfill"]:
        return "load" if self.load is not None else "backfill"


def resolve_source(source: str, at_ms: int) -> str:
    """`{date}` in a load source -> the UTC day of `at_ms`."""
    day = datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%Y-%m-%d")
    return source.replace("{date}", day)


def cron_fires(schedule: str, after_ms: int, count: int = 1) -> list[int]:
    """The next `count` times (epoch ms) the schedule fires after `after_ms`."""
    it = CronSim(schedule, datetime.fromtimestamp(after_ms / 1000, UTC))
    return [int(next(it).timestamp() * 1000) for _ in range(count)]


def cron_latest(schedule: str, at_ms: int) -> int:
    """The schedule's latest fire time at or before `at_ms` (a bad line is a ValueError)."""
    try:
        start = datetime.fromtimestamp(at_ms / 1000, UTC) + timedelta(milliseconds=1)
        it = CronSim(schedule, start, reverse=True)  # strictly before its start
    except CronSimError as exc:
        raise ValueError(f"bad cron line {quote(schedule)}: {exc}") from None
    return int(next(it).timestamp() * 1000)


def cron_period_ms(schedule: str, at_ms: int) -> int:
    """The longest gap between two fires in the week after `at_ms`: the job's period."""
    fires = cron_fires(schedule, at_ms, 8)
    return max(b - a for a, b in itertools.pairwise(fires))


def job_named(jobs: Mapping[str, BatchJob], name: str) -> BatchJob:
    """The job of that name; a FeatureplaneError naming the closest when there is none."""
    if not jobs:
        raise FeatureplaneError("the spec declares no batch_jobs")
    if name not in jobs:
        close = difflib.get_close_matches(name, list(jobs), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FeatureplaneError(f"unknown batch job {name!r}{hint}; known: {', '.join(jobs)}")
    return jobs[name]


def select(jobs: Mapping[str, BatchJob], names: Sequence[str]) -> list[BatchJob]:
    """The named jobs (all when none is named) and what they depend on, in DAG order; an
    unknown name is a FeatureplaneError."""
    if not jobs:
        raise FeatureplaneError("the spec declares no batch_jobs")
    for name in names:
        job_named(jobs, name)
    return needed(jobs, names or list(jobs))


def iso_time(ms: float) -> str:
    """Epoch ms as people read it in logs and reports: 2026-11-30T03:30:00Z."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def needed(jobs: Mapping[str, BatchJob], names: Iterable[str]) -> list[BatchJob]:
    """The named jobs and everything they depend on, dependencies first (the spec has no
    cycles: `featureplane.spec` refuses them); ties in spec order."""
    wanted: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(jobs[name].after)
    done: list[BatchJob] = []
    placed: set[str] = set()
    while len(done) < len(wanted):
        for job in jobs.values():
            if job.name in wanted and job.name not in placed and set(job.after) <= placed:
                done.append(job)
                placed.add(job.name)
    return done


def schedule_runs(jobs: Mapping[str, BatchJob]) -> dict[str, list[BatchJob]]:
    """Cron line -> the jobs one of its runs does, in order.

    A run of a schedule does the jobs with that schedule, the unscheduled jobs that come
    `after` them (transitively), and whatever those depend on."""
    downstream: dict[str, list[str]] = {name: [] for name in jobs}
    for job in jobs.values():
        for up in job.after:
            downstream[up].append(job.name)
    runs: dict[str, list[BatchJob]] = {}
    for cron in dict.fromkeys(j.schedule for j in jobs.values() if j.schedule):
        roots = [j.name for j in jobs.values() if j.schedule == cron]
        todo, seen = list(roots), set(roots)
        while todo:
            for down in downstream[todo.pop()]:
                if down not in seen and jobs[down].schedule is None:
                    seen.add(down)
                    todo.append(down)
        runs[cron] = needed(jobs, seen)
    return runs

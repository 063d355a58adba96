"""How a batch job splits into shards, how many, and one shard's run.

A load is a list of pieces (whole files, JSONL byte ranges cut at line ends,
Parquet row groups) dealt to N shards contiguously by bytes; a backfill is a
set of (partition, time slice) units dealt to N shards. Both splits depend
only on what every machine sees alike (the file listing and footers, the
partition count, the time range, N), so `--shard I/N` for every I over one N
does the whole job exactly once, wherever each shard runs.

`plan_job` surveys a job's input and picks N; `run_shard` runs one shard
through the same code as `featureplane load|backfill --shard I/N --at`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from featureplane.jobs import BatchJob, resolve_source, resolve_time
from featureplane.settings import Settings
from featureplane.spec import Catalog

__all__ = [
    "DEFAULT_SPEED",
    "MIN_RANGE",
    "JobPlan",
    "LineCutter",
    "Piece",
    "ShardResult",
    "backfill_units",
    "cut",
    "plan_job",
    "run_shard",
    "split",
]

# Per-shard speed before any run of the job has been measured, on the 2-core dev
# machine (other test runs sharing it), one process, embedded store, default batch
# sizes: 50,000 click rows (5,000 ids) loaded from JSONL (4.6 MB) in 5.4 s -> 0.86 MB/s
# (9,300 rows/s); the same rows from Parquet (snappy, 0.73 MB) in 4.0 s -> 0.18 MB/s
# of file (12,500 rows/s); the same 50,000 events backfilled from a tansu topic in
# 5.3 s and 7.5 s on two runs -> 6,700-9,400 records/s.
DEFAULT_SPEED: dict[str, float] = {
    "bytes": 900_000.0,
    "parquet": 180_000.0,
    "records": 8_000.0,
}
"""Units per second one shard does, by unit ("bytes" of JSONL, "parquet" bytes, "records")."""

MIN_RANGE = 64 * 1024
"""The smallest JSONL byte range or split Parquet file: below it a piece is not worth its
own open or GET."""


@dataclass(frozen=True, slots=True)
class Piece:
    """A part of a load's input: a whole file, a byte range of a JSONL file, or a run of
    row groups of a Parquet file."""

    source: str
    """The file: a local path or s3://bucket/key."""
    size: int
    """Its bytes (for row groups: their compressed size)."""
    kind: Literal["file", "bytes", "row_groups"]
    start: int = 0
    """bytes: first byte; row_groups: first row group."""
    end: int = 0
    """bytes: end byte (exclusive); row_groups: end row group (exclusive)."""
    first_row: int = 0
    """row_groups: the file's row number (from 0) of the first row of `start`."""


@dataclass(frozen=True, slots=True)
class JobPlan:
    """What one job will do: its input, shard count and expected duration, and why."""

    job: BatchJob
    at_ms: int
    shards: int
    size: int
    unit: Literal["bytes", "records"]
    inputs: str
    speed: float
    speed_measured: bool
    estimate_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class ShardResult:
    """What one shard did."""

    done: int
    """Rows or records written."""
    rejected: int
    """Rows rejected or records malformed."""
    work: int
    """Units of input done (bytes or records), for the speed measurement."""


def cut(size: int, target: int) -> list[tuple[int, int]]:
    """[0, size) in about equal ranges of at most `target` bytes (at least one range)."""
    k = max(1, math.ceil(size / max(target, 1)))
    return [(size * j // k, size * (j + 1) // k) for j in range(k)]


def split(pieces: Sequence[Piece], n: int) -> list[list[Piece]]:
    """The pieces dealt to `n` shards in order, contiguously, balanced by bytes.

    A piece goes to the shard whose share of the total holds its middle byte, so
    the result depends on the pieces and `n` alone."""
    shards: list[list[Piece]] = [[] for _ in range(n)]
    total = sum(p.size for p in pieces)
    at = 0
    for index, p in enumerate(pieces):
        if total:
            i = (2 * at + p.size) * n // (2 * total)
        else:  # nothing but empty files: deal them by count
            i = index * n // len(pieces)
        shards[min(i, n - 1)].append(p)
        at += p.size
    return shards


class LineCutter:
    """The lines of a byte range [a, b) of a text, from chunks read from byte max(a-1, 0).

    A line belongs to the range holding its first byte: a range that does not start
    the text skips to after the first newline at or after a-1, then takes lines while
    a line's first byte is before b. Feed chunks, then call `end`; each gives
    (offset of the line's first byte, the line with its newline)."""

    def __init__(self, a: int, b: int) -> None:
        self.b, self.pos, self.skip = b, max(a - 1, 0), a > 0
        self.buf = b""
        self.done = False

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        if self.done:
            return []
        *lines, self.buf = (self.buf + chunk).split(b"\n")
        out: list[tuple[int, bytes]] = []
        for body in lines:
            start, line = self.pos, body + b"\n"
            self.pos += len(line)
            if self.skip:
                self.skip = False
            elif start >= self.b:
                self.done = True
                break
            else:
                out.append((start, line))
        return out

    def end(self) -> list[tuple[int, bytes]]:
        """The last line when the text does not end with a newline."""
        if self.done or self.skip or not self.buf or self.pos >= self.b:
            return []
        self.done = True
        return [(self.pos, self.buf)]


def cut_lines(chunks: Iterable[bytes], a: int, b: int) -> list[tuple[int, bytes]]:
    """All the lines of [a, b) at once (tests and small inputs)."""
    cutter = LineCutter(a, b)
    out = [x for c in chunks for x in cutter.feed(c)]
    return out + cutter.end()


def backfill_units(
    partitions: Sequence[int], start: int, end: int, shard: tuple[int, int] | None
) -> dict[int, tuple[int, int]]:
    """Partition -> the inclusive time range shard I of N reads in it.

    N <= P: partitions dealt round-robin, each whole. N > P: each partition cut into
    ceil(N/P) equal time slices and the (partition, slice) units, partition by
    partition, dealt round-robin; a shard then gets units i and i+N only, which
    are never of the same partition (N >= slices per partition), so one pass reads
    them all. The split depends on (P, start, end, N) alone, never on the data."""
    parts = sorted(partitions)
    if shard is None:
        return {p: (start, end) for p in parts}
    i, n = shard
    if n <= len(parts):
        return {p: (start, end) for index, p in enumerate(parts) if index % n == i}
    k = math.ceil(n / len(parts)) if parts else 1
    span = end - start + 1
    units: dict[int, tuple[int, int]] = {}
    for index, p in enumerate(parts):
        for j in range(k):
            if (index * k + j) % n != i:
                continue
            lo, hi = start + span * j // k, start + span * (j + 1) // k - 1
            if lo <= hi:
                assert p not in units  # see the docstring
                units[p] = (lo, hi)
    return units


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1_000_000 else f"{n:,}"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


async def plan_job(
    settings: Settings, catalog: Catalog, job: BatchJob, at_ms: int, speed: float | None
) -> JobPlan:
    """Survey the job's input as of `at_ms` and pick its shard count.

    Auto: N = ceil(size / (speed x target duration)), at least 1, at most
    `batch_max_shards`, and for a load at most the pieces the input cuts into.
    Raises FeatureplaneError when the input is missing."""
    from featureplane.batch import backfill, sources

    if job.load is not None:
        fmt = job.load.file_format
        files = await sources.list_files(resolve_source(job.load.source, at_ms))
        size = sum(s for _, s in files)
        unit: Literal["bytes", "records"] = "bytes"
        default = DEFAULT_SPEED["parquet" if fmt == "parquet" else "bytes"]
        inputs = f"{len(files)} {fmt} file{'s' * (len(files) != 1)}, {_mb(size)}"
        rate = speed or default
        shown = f"{_mb(size)} at {rate / 1e6:.2f} MB/s per shard"
    else:
        assert job.backfill is not None
        bf = job.backfill
        start, end = resolve_time(bf.from_, at_ms), resolve_time(bf.to, at_ms)
        parts, size = backfill.survey(settings, bf.topic, start, end)
        unit, default = "records", DEFAULT_SPEED["records"]
        inputs = f"{parts} partition{'s' * (parts != 1)}, {_count(size)} records"
        rate = speed or default
        shown = f"{_count(size)} records at {rate:,.0f}/s per shard"
    target_s = settings.batch_target_duration / 1000
    single_s = size / rate
    if job.parallelism != "auto":
        n = job.parallelism
        reason = f"parallelism: {n} in the spec"
    else:
        wanted = max(1, math.ceil(single_s / target_s))
        n = min(wanted, settings.batch_max_shards)
        reason = f"auto: {shown} -> {_duration(single_s)} with 1 shard"
        if wanted == 1:
            reason += f", under the {_duration(target_s)} target"
        else:
            reason += f", {wanted} shards for the {_duration(target_s)} target"
        if wanted > settings.batch_max_shards:
            reason += f", capped at batch_max_shards={settings.batch_max_shards}"
    if job.load is not None and n > 1:
        pieces = await sources.pieces(files, job.load.file_format, n)
        if job.parallelism == "auto" and len(pieces) < n:  # a shard per piece at most
            n = len(pieces)
            reason += f", {n} piece{'s' * (n != 1)} to share"
        inputs += f", {len(pieces)} pieces"
    return JobPlan(
        job=job,
        at_ms=at_ms,
        shards=n,
        size=size,
        unit=unit,
        inputs=inputs,
        speed=rate,
        speed_measured=speed is not None,
        estimate_s=single_s / n,
        reason=reason,
    )


async def run_shard(
    settings: Settings,
    catalog: Catalog,
    job: BatchJob,
    at_ms: int,
    shard: tuple[int, int],
    report: Callable[[int, int], None] | None = None,
    rejects: Path | None = None,
) -> ShardResult:
    """Run shard I of N of `job` as of `at_ms`: the code of `load|backfill --shard I/N
    --at`. `report(done, rejected)` gets the counts after each written batch; without it
    the shard prints its own progress line. Raises FeatureplaneError on failure."""
    from featureplane.batch import backfill, load

    if job.load is not None:
        lj = load.LoadJob(
            source=resolve_source(job.load.source, at_ms),
            group=job.load.group,
            format=job.load.file_format,
            batch_size=1000,
            rejects=rejects,
            shard=shard,
        )
        done = await load.load_shard(settings, catalog, lj, report)
        if rejects is not None and done.rejects:
            load.write_rejects(lj, done.rejects)
        return ShardResult(done.done, len(done.rejects), done.work)
    assert job.backfill is not None
    bf = job.backfill
    bj = backfill.BackfillJob(
        topic=bf.topic,
        start=resolve_time(bf.from_, at_ms),
        end=resolve_time(bf.to, at_ms),
        groups=",".join(bf.groups) if bf.groups else None,
        batch_size=2000,
        grace_ms=3_600_000,
        max_attempts=8,
        shard=shard,
    )
    counts = await backfill.backfill(settings, catalog, bj, report)
    return ShardResult(
        counts["in range"] - counts["malformed"], counts["malformed"], counts["in range"]
    )

"""`featureplane load`: JSONL or Parquet files (local or s3://, a glob) into one feature group.

The source lists into files and pieces (`sources`), and `--shard I/N` loads
the pieces `shards.split` deals to shard I (all of them without a shard).
Rows become checked items (`item_of`), written in batches through the batch
`Sink`; a row that does not fit is a `Reject` with its line (or row, or for a
later JSONL range of a sharded load the line's byte offset) and reason, and
the rest loads. A row without `event_id` gets one derived from its content,
so loading a file again overwrites instead of duplicating; a load stopped
midway can simply run again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from featureplane.batch.progress import Progress
from featureplane.batch.shards import ShardResult, split
from featureplane.batch.sink import Sink
from featureplane.batch.sources import (
    Format,
    list_files,
    open_s3,
    pieces,
    rows,
    s3_errors,
    unreadable,
)
from featureplane.codec import Item, make_item
from featureplane.errors import FeatureplaneError, ValidationError
from featureplane.settings import Settings
from featureplane.spec import Catalog, FeatureGroup
from featureplane.stores import open_cache, open_store

__all__ = [
    "LoadJob",
    "LoadResult",
    "Reject",
    "item_of",
    "load",
    "load_shard",
    "run",
    "write_rejects",
]

log = logging.getLogger(__name__)
_META = frozenset({"id", "ts", "event_id", "features"})


@dataclass(frozen=True, slots=True)
class LoadJob:
    """What to load where, as the command line gives it."""

    source: str
    """A local path or s3://bucket/key, a glob."""
    group: str
    """The feature group to load into."""
    format: Format | None
    """The files' format; None: by extension (.parquet, else jsonl)."""
    batch_size: int
    """Items per write."""
    rejects: Path | None
    """Where to also write rejected rows, with reasons, as JSONL."""
    shard: tuple[int, int] | None = None
    """(I, N): only shard I of N; None: all of it."""


@dataclass(frozen=True, slots=True)
class Reject:
    """A row that did not load: where it was and why."""

    row: int
    """Its line or row number (from 1), or for a JSONL byte range its byte offset."""
    reason: str
    raw: str
    source: str = ""
    """The file it was in."""
    unit: Literal["line", "row", "byte"] = "line"
    """What `row` counts."""


@dataclass(slots=True)
class LoadResult:
    """What a load (or one shard of it) did."""

    done: int = 0
    rejects: list[Reject] = field(default_factory=list)
    work: int = 0
    """Bytes of input read."""


def item_of(group: FeatureGroup, row: Any) -> Item:
    """One row -> a checked item; raises ValidationError naming the problem."""
    if not isinstance(row, dict):
        raise ValidationError("a row must be an object")
    entity_id: Any = row.get("id")
    ts: Any = row.get("ts")  # make_item checks it
    if isinstance(entity_id, int) and not isinstance(entity_id, bool):
        entity_id = str(entity_id)
    if not isinstance(entity_id, str):
        raise ValidationError(f"id must be a string, got {entity_id!r:.60}")
    features = row.get("features")
    if features is None:
        features = {k: v for k, v in row.items() if k not in _META}
    elif not isinstance(features, dict):
        raise ValidationError("features must be an object of feature name -> value")
    event_id = row.get("event_id")
    if event_id is None:
        event_id = (
            "load:"
            + hashlib.blake2b(
                orjson.dumps(row, option=orjson.OPT_SORT_KEYS), digest_size=16
            ).hexdigest()
        )
    return make_item(group, entity_id, ts, str(event_id), features)


def _format(job: LoadJob) -> Format:
    return job.format or ("parquet" if job.source.endswith(".parquet") else "jsonl")


async def load_shard(
    settings: Settings,
    catalog: Catalog,
    job: LoadJob,
    report: Callable[[int, int], None] | None = None,
) -> LoadResult:
    """Load the job's shard (all of it without one); `report(done, rejected)` after each
    written batch, else a progress line on stderr."""
    group = catalog.groups.get(job.group)
    if group is None:
        raise FeatureplaneError(f"unknown group {job.group!r} (known: {', '.join(catalog.groups)})")
    if group.on_demand:
        raise FeatureplaneError(f"group {group.name!r} is on-demand: it is never stored")
    fmt = _format(job)
    i, n = job.shard or (0, 1)
    result, rejected = LoadResult(), 0
    async with AsyncExitStack() as stack:
        s3 = None
        if job.source.startswith("s3://"):
            s3 = await stack.enter_async_context(open_s3())
        files = await list_files(job.source, s3)
        mine = split(await pieces(files, fmt, n if job.shard else 1, s3), n)[i]
        label = f"load {group.name}" + (f" shard {i}/{n}" if job.shard else "")
        progress = None if report else Progress(label, sum(p.size for p in mine))
        failing: tuple[type[Exception], ...] = (OSError, *s3_errors())
        sink = await stack.enter_async_context(
            Sink(open_store(settings, catalog), open_cache(settings, catalog))
        )
        batch: list[Item] = []

        async def flush() -> None:
            nonlocal batch, rejected
            await sink.write(batch)
            result.done += len(batch)
            if report:
                report(len(batch), rejected)
            elif progress:
                progress.advance(done=len(batch), rejected=rejected)
            batch, rejected = [], 0

        for piece in mine:
            piece_rows = rows(piece, fmt, s3, job.batch_size)
            try:
                async for at, unit, _, row, raw in piece_rows:
                    try:
                        if isinstance(row, ValidationError):
                            raise row
                        batch.append(item_of(group, row))
                    except ValidationError as exc:
                        text = raw.decode("utf-8", "replace").rstrip("\n")
                        result.rejects.append(Reject(at, str(exc), text, piece.source, unit))
                        rejected += 1
                    if len(batch) >= job.batch_size:
                        await flush()
            except failing as exc:
                raise unreadable(piece.source, exc) from None
            result.work += piece.size
        await flush()
    if progress:
        progress.finish()
    return result


async def load(settings: Settings, catalog: Catalog, job: LoadJob) -> list[Reject]:
    """Load the job (or its shard); the rows that did not load."""
    return (await load_shard(settings, catalog, job)).rejects


def _where(r: Reject) -> str:
    if r.unit == "byte":
        return f"{r.source}: line at byte {r.row} (a range of a sharded load)"
    return f"{r.source}:{r.row}"


def write_rejects(job: LoadJob, rejects: list[Reject]) -> None:
    """All the rejected rows to `job.rejects`, as JSONL with their file and reason."""
    assert job.rejects is not None
    with job.rejects.open("wb") as f:
        for r in rejects:
            f.write(
                orjson.dumps({"file": r.source, r.unit: r.row, "reason": r.reason, "raw": r.raw})
                + b"\n"
            )


def run(settings: Settings, catalog: Catalog, job: LoadJob) -> int:
    """Load, print the rejected rows (the first 20) and write them all to `job.rejects`;
    0 when every row loaded, else 1. A shard with a Pushgateway pushes its counts."""
    result: ShardResult | None = None
    try:
        done = asyncio.run(load_shard(settings, catalog, job))
        result = ShardResult(done.done, len(done.rejects), done.work)
    except FeatureplaneError as exc:
        _push(settings, job, None, str(exc))
        raise
    _push(settings, job, result, None)
    rejects = done.rejects
    if not rejects:
        return 0
    for r in rejects[:20]:
        print(f"{_where(r)}: {r.reason}", file=sys.stderr)
    if len(rejects) > 20:
        print(f"... and {len(rejects) - 20} more", file=sys.stderr)
    if job.rejects:
        write_rejects(job, rejects)
        print(f"rejected rows written to {job.rejects}", file=sys.stderr)
    what = "row" if _format(job) == "parquet" else "line"
    print(f"{len(rejects)} {what}(s) rejected", file=sys.stderr)
    return 1


def _push(settings: Settings, job: LoadJob, result: ShardResult | None, error: str | None) -> None:
    """A shard's counts to the Pushgateway, so a short-lived pod's metrics outlive it;
    labelled with its batch job (FEATUREPLANE_BATCH_JOB), else with what it loads."""
    if not (settings.pushgateway_url and job.shard):
        return
    from featureplane.batch.metrics import push_shard

    # no batch job set: label the series load_<group>, not one fixed job for every load
    named = settings.model_copy(update={"batch_job": settings.batch_job or f"load_{job.group}"})
    push_shard(named, job.shard, result, error)

"""`featureplane load`: a JSONL or Parquet file (local or s3://) into one feature group.

Rows become checked items (`item_of`), written in batches through the batch
`Sink`; a row that does not fit is a `Reject` with its line (or row) number
and reason, and the rest loads. A row without `event_id` gets one derived
from its content, so loading a file again overwrites instead of duplicating.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from featureplane.batch.progress import Progress
from featureplane.batch.sink import Sink
from featureplane.codec import Item, make_item
from featureplane.errors import FeatureplaneError, ValidationError
from featureplane.settings import Settings
from featureplane.spec import Catalog, FeatureGroup
from featureplane.stores import open_cache, open_store

__all__ = ["LoadJob", "Reject", "item_of", "load", "run"]

log = logging.getLogger(__name__)
_META = frozenset({"id", "ts", "event_id", "features"})


@dataclass(frozen=True, slots=True)
class LoadJob:
    """What to load where, as the command line gives it."""

    source: str
    """A local path or s3://bucket/key."""
    group: str
    """The feature group to load into."""
    format: Literal["jsonl", "parquet"] | None
    """The file's format; None: by extension (.parquet, else jsonl)."""
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
    reason: str
    raw: str


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


def _jsonl_rows(path: Path) -> Iterator[tuple[int, int, Any, bytes]]:
    """(line number, byte position, parsed row or a ValidationError, raw line)."""
    with path.open("rb") as f:
        position = 0
        for n, line in enumerate(f, 1):
            position += len(line)
            if not line.strip():
                continue
            try:
                yield n, position, orjson.loads(line), line
            except orjson.JSONDecodeError as exc:
                yield n, position, ValidationError(f"not valid JSON: {exc}"), line


def _parquet_rows(path: Path, batch: int) -> Iterator[tuple[int, int, Any, bytes]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FeatureplaneError(
            "loading Parquet needs pyarrow: pip install 'featureplane[parquet]'"
        ) from None
    f = pq.ParquetFile(path)
    n = 0
    for record_batch in f.iter_batches(batch_size=batch):
        for row in record_batch.to_pylist():
            n += 1
            yield n, n, row, b""


@asynccontextmanager
async def _local_copy(source: str) -> AsyncIterator[Path]:
    """The source as a local file: itself, or an S3 object downloaded to a temp file."""
    if not source.startswith("s3://"):
        path = Path(source)
        if not path.is_file():
            raise FeatureplaneError(f"no such file: {source}")
        yield path
        return
    bucket, _, key = source.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise FeatureplaneError(f"bad S3 address {source!r}: expected s3://bucket/key")
    import aioboto3
    from botocore.exceptions import BotoCoreError, ClientError

    with tempfile.TemporaryDirectory(prefix="fp-load-") as tmp:
        path = Path(tmp) / Path(key).name
        try:
            async with aioboto3.Session().client("s3") as s3:
                await s3.download_file(bucket, key, str(path))
        except (BotoCoreError, ClientError) as exc:
            raise FeatureplaneError(f"cannot read {source}: {exc}") from None
        log.info("downloaded %s (%d bytes)", source, path.stat().st_size)
        yield path


async def load(settings: Settings, catalog: Catalog, job: LoadJob) -> list[Reject]:
    """Load `job.source` into its group; the rows that did not load."""
    group = catalog.groups.get(job.group)
    if group is None:
        raise FeatureplaneError(f"unknown group {job.group!r} (known: {', '.join(catalog.groups)})")
    if group.on_demand:
        raise FeatureplaneError(f"group {group.name!r} is on-demand: it is never stored")
    fmt = job.format or ("parquet" if job.source.endswith(".parquet") else "jsonl")
    redis = open_cache(settings, catalog)
    rejects: list[Reject] = []
    async with _local_copy(job.source) as path, Sink(open_store(settings, catalog), redis) as sink:
        rows = _parquet_rows(path, job.batch_size) if fmt == "parquet" else _jsonl_rows(path)
        total = path.stat().st_size if fmt == "jsonl" else None
        progress = Progress(f"load {group.name}", total)
        batch: list[Item] = []
        for n, position, row, raw in rows:
            try:
                if isinstance(row, ValidationError):
                    raise row
                batch.append(item_of(group, row))
            except ValidationError as exc:
                rejects.append(Reject(n, str(exc), raw.decode("utf-8", "replace").rstrip("\n")))
                progress.advance(rejected=1, position=position)
            if len(batch) >= job.batch_size:
                await sink.write(batch)
                progress.advance(done=len(batch), position=position)
                batch = []
        await sink.write(batch)
        progress.advance(done=len(batch), position=total)
        progress.finish()
    return rejects


def run(settings: Settings, catalog: Catalog, job: LoadJob) -> int:
    """Load, print the rejected rows (the first 20) and write them all to `job.rejects`;
    0 when every row loaded, else 1."""
    rejects = asyncio.run(load(settings, catalog, job))
    if not rejects:
        return 0
    what = "line" if not job.source.endswith(".parquet") else "row"
    for r in rejects[:20]:
        print(f"{job.source}:{r.row}: {r.reason}", file=sys.stderr)
    if len(rejects) > 20:
        print(f"... and {len(rejects) - 20} more", file=sys.stderr)
    if job.rejects:
        with job.rejects.open("wb") as f:
            for r in rejects:
                f.write(orjson.dumps({what: r.row, "reason": r.reason, "raw": r.raw}) + b"\n")
        print(f"rejected rows written to {job.rejects}", file=sys.stderr)
    print(f"{len(rejects)} {what}(s) rejected", file=sys.stderr)
    return 1

"""`featureplane load`: JSONL or Parquet files (local or s3://, a glob) into one feature group.

The source lists into files (sorted), the files into pieces (`shards.Piece`:
whole files, or for a shard of several, JSONL byte ranges and Parquet row
groups), and `--shard I/N` loads the pieces `shards.split` deals to shard I.
Rows become checked items (`item_of`), written in batches through the batch
`Sink`; a row that does not fit is a `Reject` with its line (or row, or for a
JSONL range the line's byte offset) and reason, and the rest loads. A row
without `event_id` gets one derived from its content, so loading a file again
overwrites instead of duplicating; a load stopped midway can simply run again.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import glob
import hashlib
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from featureplane.batch.progress import Progress
from featureplane.batch.shards import MIN_RANGE, LineCutter, Piece, ShardResult, cut, split
from featureplane.batch.sink import Sink
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
    "list_files",
    "load",
    "load_shard",
    "pieces",
    "run",
    "write_rejects",
]

log = logging.getLogger(__name__)
_META = frozenset({"id", "ts", "event_id", "features"})
_GLOB = frozenset("*?[")
_CHUNK = 1 << 20
Format = Literal["jsonl", "parquet"]


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


def _s3_address(source: str) -> tuple[str, str]:
    bucket, _, key = source.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise FeatureplaneError(f"bad S3 address {source!r}: expected s3://bucket/key")
    return bucket, key


@functools.cache
def _session() -> Any:
    import aioboto3

    return aioboto3.Session()  # one a process: its service models load once (~0.3 s)


@asynccontextmanager
async def _s3(client: Any = None) -> AsyncIterator[Any]:
    """An S3 client: the one given, or a new one for the block."""
    if client is not None:
        yield client
        return
    async with _session().client("s3") as s3:
        yield s3


def _s3_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def _unreadable(source: str, exc: BaseException) -> FeatureplaneError:
    return FeatureplaneError(f"cannot read {source}: {str(exc).strip() or type(exc).__name__}")


async def list_files(source: str, s3_client: Any = None) -> list[tuple[str, int]]:
    """The files a source names, sorted, with their sizes; FeatureplaneError when none.

    Local: the path, or the matches of a glob (`**` across folders). S3: the object,
    or the keys under the prefix before the first glob character that match it."""
    if not source.startswith("s3://"):
        if not _GLOB & set(source):
            if not os.path.isfile(source):
                raise FeatureplaneError(f"no such file: {source}")
            return [(source, os.path.getsize(source))]
        paths = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
        if not paths:
            raise FeatureplaneError(f"no file matches {source}")
        return [(p, os.path.getsize(p)) for p in paths]
    bucket, key = _s3_address(source)
    cut_at = next((i for i, c in enumerate(key) if c in _GLOB), None)
    try:
        async with _s3(s3_client) as s3:
            if cut_at is None:
                try:
                    head = await s3.head_object(Bucket=bucket, Key=key)
                except _s3_errors()[1] as exc:
                    code = exc.response.get("Error", {}).get("Code", "")  # type: ignore[attr-defined]
                    if code not in ("404", "NoSuchKey", "NotFound"):
                        raise
                    await _check_bucket(s3, bucket)
                    raise FeatureplaneError(f"no such S3 object: {source}") from None
                return [(source, int(head["ContentLength"]))]
            found: list[tuple[str, int]] = []
            prefix, seen = key[:cut_at], 0
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            async for page in pages:
                for obj in page.get("Contents", []):
                    seen += 1
                    if fnmatch.fnmatchcase(obj["Key"], key):
                        found.append((f"s3://{bucket}/{obj['Key']}", int(obj["Size"])))
    except _s3_errors() as exc:
        if "NoSuchBucket" in str(exc):
            raise FeatureplaneError(f"no S3 bucket {bucket!r} (source {source})") from None
        raise FeatureplaneError(f"cannot list {source}: {exc}") from None
    if not seen:
        raise FeatureplaneError(
            f"nothing matches {source}: no S3 object under s3://{bucket}/{prefix}"
        )
    if not found:
        raise FeatureplaneError(
            f"nothing matches {source}: {seen} object(s) under s3://{bucket}/{prefix}, none match"
        )
    return sorted(found)


async def _check_bucket(s3: Any, bucket: str) -> None:
    try:
        await s3.head_bucket(Bucket=bucket)
    except _s3_errors():
        raise FeatureplaneError(f"no S3 bucket {bucket!r}") from None


async def _parquet_meta(source: str, s3_client: Any) -> Any:
    """A Parquet file's footer: local, or from S3 with two ranged GETs (the length, then
    the footer), without downloading the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if not source.startswith("s3://"):
            return pq.read_metadata(source)
        bucket, key = _s3_address(source)
        async with _s3(s3_client) as s3:
            tail = await (await s3.get_object(Bucket=bucket, Key=key, Range="bytes=-8"))[
                "Body"
            ].read()
            if len(tail) != 8 or tail[4:] != b"PAR1":
                raise FeatureplaneError(f"cannot read {source}: not a Parquet file")
            length = int.from_bytes(tail[:4], "little") + 8
            footer = await (await s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=-{length}"))[
                "Body"
            ].read()
        return pq.read_metadata(pa.BufferReader(b"PAR1" + footer))
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(source, exc) from None
    except _s3_errors() as exc:
        raise _unreadable(source, exc) from None


async def pieces(
    files: list[tuple[str, int]], fmt: Format, n: int, s3_client: Any = None
) -> list[Piece]:
    """The files as pieces for `n` shards: whole files for one shard; for more, a file
    larger than a quarter of a shard's share is cut (JSONL: equal byte ranges;
    Parquet: runs of its row groups, from its footer), so the shards come out even."""
    if n <= 1:
        return [Piece(src, size, "file", 0, size) for src, size in files]
    target = max(sum(s for _, s in files) // (4 * n), MIN_RANGE)
    out: list[Piece] = []
    for src, size in files:
        if size <= target:
            out.append(Piece(src, size, "file", 0, size))
        elif fmt == "jsonl":
            out.extend(Piece(src, b - a, "bytes", a, b) for a, b in cut(size, target))
        else:
            meta = await _parquet_meta(src, s3_client)
            first = row = acc = 0
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                acc += sum(rg.column(c).total_compressed_size for c in range(meta.num_columns))
                if acc >= target or g == meta.num_row_groups - 1:
                    out.append(Piece(src, acc, "row_groups", first, g + 1, row))
                    row += sum(meta.row_group(x).num_rows for x in range(first, g + 1))
                    first, acc = g + 1, 0
            if meta.num_row_groups == 0:
                out.append(Piece(src, size, "file", 0, size))
    return out


Row = tuple[int, Literal["line", "row", "byte"], int, Any, bytes]
"""(line/row number or byte offset, what it counts, bytes read so far, row or error, raw)."""


def _parse(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return ValidationError(f"not valid JSON: {exc}")


async def _jsonl_rows(piece: Piece, s3: Any) -> AsyncIterator[Row]:
    """The piece's lines: numbered for a whole file or the range that starts it, by
    byte offset for a later range (the lines before it are not read)."""
    whole = piece.kind == "file"
    a, b = (0, sys.maxsize) if whole else (piece.start, piece.end)
    cutter, number = LineCutter(a, b), 0
    unit: Literal["line", "byte"] = "line" if a == 0 else "byte"

    def rows(lines: list[tuple[int, bytes]]) -> list[Row]:
        nonlocal number
        out: list[Row] = []
        for offset, line in lines:
            number += 1
            if line.strip():
                at = number if unit == "line" else offset
                out.append((at, unit, offset - a, _parse(line), line))
        return out

    if piece.source.startswith("s3://"):
        bucket, key = _s3_address(piece.source)
        extra = {} if a == 0 else {"Range": f"bytes={a - 1}-"}  # ranged GET, streamed
        resp = await s3.get_object(Bucket=bucket, Key=key, **extra)
        body = resp["Body"]
        try:
            async for chunk in body.iter_chunks(_CHUNK):
                for r in rows(cutter.feed(chunk)):
                    yield r
                if cutter.done:
                    break
        finally:
            body.close()  # the rest of an open-ended range is never read
    else:
        with open(piece.source, "rb") as f:
            f.seek(max(a - 1, 0))
            while not cutter.done and (chunk := f.read(_CHUNK)):
                for r in rows(cutter.feed(chunk)):
                    yield r
    for r in rows(cutter.end()):
        yield r


async def _parquet_rows(piece: Piece, s3: Any, batch: int) -> AsyncIterator[Row]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise FeatureplaneError(
            "loading Parquet needs pyarrow: pip install 'featureplane[parquet]'"
        ) from None
    async with AsyncExitStack() as stack:
        path = piece.source
        if path.startswith("s3://"):
            # The whole object is downloaded and only the shard's row groups decoded.
            # Reading just those would take ranged GETs of each column chunk (offsets
            # in the footer) behind a pyarrow file object; not worth it at these sizes.
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fp-load-"))
            bucket, key = _s3_address(path)
            path = str(Path(tmp) / Path(key).name)
            await s3.download_file(bucket, key, path)
        groups = range(piece.start, piece.end) if piece.kind == "row_groups" else None
        n = piece.first_row
        try:
            f = pq.ParquetFile(path)
            for record_batch in f.iter_batches(batch_size=batch, row_groups=groups):
                for row in record_batch.to_pylist():
                    n += 1
                    yield n, "row", 0, row, b""
        except pa.ArrowException as exc:
            raise _unreadable(piece.source, exc) from None


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
            s3 = await stack.enter_async_context(_s3())
        files = await list_files(job.source, s3)
        mine = split(await pieces(files, fmt, n if job.shard else 1, s3), n)[i]
        label = f"load {group.name}" + (f" shard {i}/{n}" if job.shard else "")
        progress = None if report else Progress(label, sum(p.size for p in mine))
        unreadable: tuple[type[Exception], ...] = (OSError, *_s3_errors())
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
            rows = (
                _parquet_rows(piece, s3, job.batch_size)
                if fmt == "parquet"
                else _jsonl_rows(piece, s3)
            )
            try:
                async for at, unit, _, row, raw in rows:
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
            except unreadable as exc:
                raise _unreadable(piece.source, exc) from None
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
        _push(settings, job.shard, None, str(exc))
        raise
    _push(settings, job.shard, result, None)
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


def _push(
    settings: Settings, shard: tuple[int, int] | None, result: ShardResult | None, error: str | None
) -> None:
    """A shard's counts to the Pushgateway, so a short-lived pod's metrics outlive it."""
    if not (settings.pushgateway_url and shard):
        return
    from featureplane.batch.metrics import push_shard

    push_shard(settings, shard, result, error)

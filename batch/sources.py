"""Where `featureplane load` reads: sources as globs, their pieces, and the rows of a piece.

A source (a local path or s3://bucket/key, a glob) lists into files, sorted;
for a shard of several, large files are cut into pieces (JSONL byte ranges
cut at line ends, runs of Parquet row groups from the footer) so that
`shards.split` can deal them evenly. A piece's rows are read locally, with
streamed ranged GETs (S3 JSONL), or from a downloaded copy (S3 Parquet). A
file that cannot be read is a FeatureplaneError naming it.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import orjson

from featureplane.batch.shards import MIN_RANGE, LineCutter, Piece, cut
from featureplane.errors import FeatureplaneError, ValidationError

__all__ = ["Format", "Row", "list_files", "open_s3", "pieces", "rows", "s3_errors", "unreadable"]

_GLOB = frozenset("*?[")
_CHUNK = 1 << 20
Format = Literal["jsonl", "parquet"]


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
async def open_s3(client: Any = None) -> AsyncIterator[Any]:
    """An S3 client: the one given, or a new one for the block."""
    if client is not None:
        yield client
        return
    async with _session().client("s3") as s3:
        yield s3


def s3_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def unreadable(source: str, exc: BaseException) -> FeatureplaneError:
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
        async with open_s3(s3_client) as s3:
            if cut_at is None:
                try:
                    head = await s3.head_object(Bucket=bucket, Key=key)
                except s3_errors()[1] as exc:
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
    except s3_errors() as exc:
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
    except s3_errors():
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
        async with open_s3(s3_client) as s3:
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
        raise unreadable(source, exc) from None
    except s3_errors() as exc:
        raise unreadable(source, exc) from None


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
"""A row of a piece: (line or row number, or byte offset; what it counts; bytes read so far
in the piece; the parsed row or its ValidationError; the raw line)."""


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
            raise unreadable(piece.source, exc) from None


def rows(piece: Piece, fmt: Format, s3: Any, batch: int) -> AsyncIterator[Row]:
    """The rows of a piece, in file order."""
    return _parquet_rows(piece, s3, batch) if fmt == "parquet" else _jsonl_rows(piece, s3)

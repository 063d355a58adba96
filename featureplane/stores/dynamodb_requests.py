"""The DynamoDB store's requests as plain functions: item <-> attribute maps (in
DynamoDB's JSON wire shapes: `B` base64 text, `N` decimal text), chunking, dedupe,
error mapping, and the batch loops that resend unprocessed work with backoff.

The loops take any `Call`, so a fake client tests them; nothing here holds a connection.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import aiohttp

from featureplane.backoff import backoff_ms
from featureplane.codec import Item, Record
from featureplane.errors import StoreError, TransientStoreError
from featureplane.keys import NULL_SK, partition_key, replaces
from featureplane.spec import FeatureGroup

__all__ = [
    "CRC_MISMATCH",
    "MAX_ATTEMPTS",
    "READ_CHUNK",
    "WRITE_CHUNK",
    "Call",
    "DynamoWireError",
    "batch_get_all",
    "batch_write_all",
    "chunked",
    "expiry_s",
    "item_attrs",
    "item_key",
    "map_error",
    "newest_per_key",
    "record_of",
    "unique_puts",
]

WRITE_CHUNK = 25  # BatchWriteItem's limit
READ_CHUNK = 100  # BatchGetItem's limit
MAX_ATTEMPTS = 8  # for unprocessed items/keys: ~6 s of backoff at most

Call = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""Runs one DynamoDB operation (`"BatchWriteItem"`, params) and returns its response."""

CRC_MISMATCH = "CRC32Mismatch"
"""The code of a response whose `x-amz-crc32` does not match its body (retried)."""

_T = TypeVar("_T")
_TRANSIENT_CODES = frozenset(
    {  # DynamoDB's throttling and outage codes, and botocore's "standard" retry lists
        CRC_MISMATCH,
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "TransactionInProgressException",
        "PriorRequestNotComplete",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


# ---------------------------------------------------------------- pure logic


def chunked(seq: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    """Consecutive slices of at most `size` elements."""
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def expiry_s(group: FeatureGroup, ts: int) -> int | None:
    """TTL epoch seconds of an item (rounded up, never early), or None when kept forever."""
    if group.kind != "timeseries" or group.retention is None:
        return None
    return -(-(ts + group.retention) // 1000)


def item_key(group: FeatureGroup, item: Item) -> tuple[str, str]:
    """The (pk, sk) an item is stored under."""
    sk = item.version if group.kind == "timeseries" else NULL_SK
    return partition_key(item.group, item.id), sk


def item_attrs(group: FeatureGroup, item: Item) -> dict[str, Any]:
    """An item as a DynamoDB attribute map."""
    pk, sk = item_key(group, item)
    attrs: dict[str, Any] = {
        "pk": {"S": pk},
        "sk": {"S": sk},
        "v": {"B": base64.b64encode(item.value).decode("ascii")},  # B is base64 on the wire
        "ts": {"N": str(item.ts)},
    }
    if group.kind == "latest":
        attrs["ver"] = {"S": item.version}
    exp = expiry_s(group, item.ts)
    if exp is not None:
        attrs["exp"] = {"N": str(exp)}
    return attrs


def record_of(attrs: dict[str, Any]) -> Record:
    """A DynamoDB attribute map (as read off the wire) back to a Record."""
    ver = attrs["ver"]["S"] if "ver" in attrs else attrs["sk"]["S"]
    return Record(int(attrs["ts"]["N"]), ver, base64.b64decode(attrs["v"]["B"]))


def unique_puts(puts: Iterable[tuple[tuple[str, str], _T]]) -> list[_T]:
    """Drop repeated (pk, sk) keys, the last one winning: BatchWriteItem rejects duplicates."""
    out: dict[tuple[str, str], _T] = {}
    for key, value in puts:
        out.pop(key, None)  # re-insert so order follows the last occurrence
        out[key] = value
    return list(out.values())


def newest_per_key(items: Iterable[Item]) -> list[Item]:
    """What each (group, id) keeps after `items` are written in order (`keys.replaces`
    applied left to right, as `keys.newest` does), in first-seen order."""
    best: dict[tuple[str, str], Item] = {}
    for item in items:
        key = (item.group, item.id)
        cur = best.get(key)
        if cur is None or replaces(item.version, cur.version):
            best[key] = item
    return list(best.values())


class DynamoWireError(Exception):
    """An error DynamoDB answered: its code (`ConditionalCheckFailedException`, the part
    of `__type` after `#`), message and HTTP status. Never raised to callers: it is the
    cause of the StoreError `map_error` makes, where `DynamoStore` reads the code."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code, self.message, self.status = code, message, status


def map_error(exc: BaseException, what: str) -> StoreError:
    """A DynamoDB/aiohttp failure as a StoreError, transient when a retry may succeed."""
    if isinstance(exc, DynamoWireError):
        detail = exc.message.strip()
        msg = f"DynamoDB {what} failed: {exc.code}" + (f": {detail}" if detail else "")
        if exc.code in _TRANSIENT_CODES or exc.status >= 500:
            return TransientStoreError(msg)
        return StoreError(msg)
    if isinstance(exc, aiohttp.ClientError | TimeoutError | OSError):
        return TransientStoreError(f"DynamoDB {what} failed: {type(exc).__name__}: {exc}")
    return StoreError(f"DynamoDB {what} failed: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- retry loops


async def batch_write_all(
    call: Call,
    table: str,
    requests: list[dict[str, Any]],
    *,
    attempts: int = MAX_ATTEMPTS,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rand: random.Random | None = None,
) -> None:
    """One BatchWriteItem (<= 25 requests), resending UnprocessedItems with backoff."""
    pending: dict[str, Any] = {table: requests}
    for attempt in range(attempts):
        if attempt:
            await sleep(backoff_ms(attempt - 1, rand=rand) / 1000)
        resp = await call("BatchWriteItem", {"RequestItems": pending})
        pending = resp.get("UnprocessedItems") or {}
        if not pending:
            return
    left = sum(len(v) for v in pending.values())
    raise TransientStoreError(
        f"DynamoDB BatchWriteItem left {left} items unprocessed after {attempts} attempts"
    )


async def batch_get_all(
    call: Call,
    table: str,
    keys: list[dict[str, Any]],
    *,
    projection: str,
    names: dict[str, str],
    consistent: bool = True,
    attempts: int = MAX_ATTEMPTS,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rand: random.Random | None = None,
) -> list[dict[str, Any]]:
    """One BatchGetItem (<= 100 distinct keys), resending UnprocessedKeys with backoff."""
    pending: dict[str, Any] = {
        table: {
            "Keys": keys,
            "ProjectionExpression": projection,
            "ExpressionAttributeNames": names,
            "ConsistentRead": consistent,
        }
    }
    found: list[dict[str, Any]] = []
    for attempt in range(attempts):
        if attempt:
            await sleep(backoff_ms(attempt - 1, rand=rand) / 1000)
        resp = await call("BatchGetItem", {"RequestItems": pending})
        found.extend(resp.get("Responses", {}).get(table, []))
        pending = resp.get("UnprocessedKeys") or {}
        if not pending:
            return found
    left = sum(len(v.get("Keys", [])) for v in pending.values())
    raise TransientStoreError(
        f"DynamoDB BatchGetItem left {left} keys unprocessed after {attempts} attempts"
    )

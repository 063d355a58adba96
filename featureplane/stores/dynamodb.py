"""The DynamoDB store: one table, keyed as `keys` describes (Karrot's design).

Table: `pk` (S, HASH) = `<group>#<id>`; `sk` (S, RANGE) = the event version
for `timeseries`, `keys.NULL_SK` for `latest`. Attributes: `v` (B, the encoded
value), `ts` (N), `ver` (S, the version; `latest` only, since for timeseries
it is `sk`), and `exp` (N, epoch seconds) for groups with a retention, which
DynamoDB TTL deletes lazily; reads hide expired items themselves.

Writes: timeseries items through BatchWriteItem (25 a request, duplicates
removed, UnprocessedItems retried with backoff); latest items reduced to the
newest per key (`keys.newest`), then a conditional PutItem each whose
condition is `keys.replaces` (stored version <= new), so an older value never
overwrites a newer one whatever the arrival order, and a replay rewrites
itself without a conditional failure. Reads: latest through
BatchGetItem (100 keys a request), timeseries through one Query each, newest
first. Every request runs under one semaphore of `concurrency` slots.

Every request, table set-up included, goes through `stores._dynamo_http`: DynamoDB's
JSON protocol built and parsed with orjson over one aiohttp session, signed here
(botocore's per-request model machinery cost ~2 ms of CPU a request). Region,
endpoint and credentials are still botocore's to find, once at start
(AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_DYNAMODB, the config and credentials files,
instance roles, IRSA...), and botocore refreshes expiring credentials. Two
fallbacks, for a local endpoint (dynalite, DynamoDB Local) that accepts any region
and signature: with no region anywhere, `us-east-1`; with an `endpoint_url` and no
credentials anywhere, dummy ones.

The pure parts and the batch loops are in `stores.dynamodb_requests`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import aioboto3
from botocore.exceptions import BotoCoreError

from featureplane.codec import Item, Record
from featureplane.errors import NotStartedError, StoreError, TransientStoreError
from featureplane.keys import NULL_SK, partition_key
from featureplane.spec import Catalog
from featureplane.stores._dynamo_http import Credentials, DynamoHttp
from featureplane.stores.base import Clock, Query, Store, wall_clock_ms, window
from featureplane.stores.dynamodb_requests import (
    READ_CHUNK,
    WRITE_CHUNK,
    DynamoWireError,
    batch_get_all,
    batch_write_all,
    chunked,
    item_attrs,
    item_key,
    newest_per_key,
    record_of,
    unique_puts,
)

__all__ = ["DynamoStore"]

log = logging.getLogger(__name__)

_TABLE_WAIT_S = 300.0
_T = TypeVar("_T")
_FALLBACK_REGION = "us-east-1"
_TS_PROJECTION = "#sk, #ts, #v"
_LATEST_PROJECTION = "#ver, #ts, #v, pk"


async def _all(coros: Iterable[Awaitable[_T]]) -> list[_T]:
    """Run concurrently; on a failure cancel the rest and raise the first error, unwrapped."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_await(c)) for c in coros]
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return [t.result() for t in tasks]


async def _await(aw: Awaitable[_T]) -> _T:
    return await aw


# ---------------------------------------------------------------- the store


class DynamoStore(Store):
    """Feature items in one DynamoDB table, through `_dynamo_http.DynamoHttp`."""

    name = "dynamodb"
    consistent_read: bool = True
    """Strongly consistent reads, so a read sees every write acknowledged before
    it (the contract). Set False to halve read cost where staleness is fine."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        table: str = "featureplane",
        endpoint_url: str | None = None,
        region: str | None = None,
        clock: Clock = wall_clock_ms,
        concurrency: int = 32,
    ) -> None:
        """`region`: None lets botocore find it (see the module docstring)."""
        super().__init__(catalog, clock)
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.table = table
        self.endpoint_url = endpoint_url
        self.region = region
        self.concurrency = concurrency
        self._client: DynamoHttp | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._client is not None:
            return
        endpoint, region, frozen = await self._resolve()
        client = DynamoHttp(endpoint, region, frozen, concurrency=self.concurrency)
        await client.start()
        self._client = client
        try:
            await self._ensure_table()
            await self._ensure_ttl()
        except BaseException:
            self._client = None
            await client.aclose()
            raise

    async def _resolve(self) -> tuple[str, str, Callable[[], Awaitable[Credentials]]]:
        """botocore's endpoint, region and credentials, or the local fallbacks."""
        try:
            session = aioboto3.Session(region_name=self.region)
            region = session.region_name or _FALLBACK_REGION
            creds = await session.get_credentials()
            if creds is None and self.endpoint_url:
                # A local endpoint (dynalite, DynamoDB Local) accepts any signature.
                return self.endpoint_url, region, _local_credentials
            if creds is None:
                raise StoreError(
                    "DynamoDB: no AWS credentials found (environment, config files, "
                    "instance role...)"
                )
            endpoint = self.endpoint_url or await _endpoint_of(session, region)
        except BotoCoreError as exc:  # a profile that does not exist, say
            raise StoreError(f"DynamoDB: cannot resolve AWS region or credentials: {exc}") from exc
        return endpoint, region, creds.get_frozen_credentials

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def ping(self) -> None:
        try:
            await self._call("DescribeTable", {"TableName": self.table})
        except NotStartedError:
            raise
        except StoreError as exc:
            raise TransientStoreError(str(exc)) from exc

    async def _ensure_table(self) -> None:
        try:
            desc = (await self._call("DescribeTable", {"TableName": self.table}))["Table"]
        except StoreError as exc:
            if _code(exc) != "ResourceNotFoundException":
                raise
            desc = await self._create_table()
        schema = {k["AttributeName"]: k["KeyType"] for k in desc.get("KeySchema", [])}
        if schema != {"pk": "HASH", "sk": "RANGE"}:
            raise StoreError(
                f"DynamoDB table {self.table!r} has key schema {schema}, "
                "expected pk (HASH) and sk (RANGE)"
            )
        delay = 0.05
        deadline = asyncio.get_running_loop().time() + _TABLE_WAIT_S
        while desc.get("TableStatus") != "ACTIVE":
            if asyncio.get_running_loop().time() > deadline:
                raise StoreError(f"DynamoDB table {self.table!r} not ACTIVE after {_TABLE_WAIT_S}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            desc = (await self._call("DescribeTable", {"TableName": self.table}))["Table"]

    async def _create_table(self) -> dict[str, Any]:
        log.info("creating DynamoDB table %s", self.table)
        params = {
            "TableName": self.table,
            "AttributeDefinitions": [
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            "KeySchema": [
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"},
            ],
            "BillingMode": "PAY_PER_REQUEST",
        }
        try:
            return dict((await self._call("CreateTable", params))["TableDescription"])
        except StoreError as exc:  # another process created it first
            if _code(exc) != "ResourceInUseException":
                raise
            return dict((await self._call("DescribeTable", {"TableName": self.table}))["Table"])

    async def _ensure_ttl(self) -> None:
        """Enable TTL on `exp`; a backend without TTL only loses the lazy deletion."""
        try:
            desc = await self._call("DescribeTimeToLive", {"TableName": self.table})
            ttl = desc.get("TimeToLiveDescription", {})
            if ttl.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
                if ttl.get("AttributeName") != "exp":
                    log.warning(
                        "DynamoDB table %s has TTL on %r, not 'exp': expired items "
                        "are hidden on read but not deleted",
                        self.table,
                        ttl.get("AttributeName"),
                    )
                return
            await self._call(
                "UpdateTimeToLive",
                {
                    "TableName": self.table,
                    "TimeToLiveSpecification": {"Enabled": True, "AttributeName": "exp"},
                },
            )
        except TransientStoreError:
            raise
        except StoreError as exc:
            if _code(exc) == "ValidationException" and "already enabled" in str(exc).lower():
                return
            log.warning(
                "could not enable TTL on DynamoDB table %s (%s): expired items are "
                "hidden on read but not deleted",
                self.table,
                exc,
            )

    # ------------------------------------------------------------ I/O

    async def _call(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        """One request (retried while transient), errors as StoreError."""
        client = self._client
        if client is None:
            raise NotStartedError("DynamoStore")
        return await client.call(op, params)

    async def write(self, items: Sequence[Item]) -> None:
        series: list[tuple[tuple[str, str], dict[str, Any]]] = []
        latest: list[Item] = []
        for item in items:
            group = self.group(item.group)
            if group.kind == "timeseries":
                attrs = item_attrs(group, item)
                series.append((item_key(group, item), {"PutRequest": {"Item": attrs}}))
            else:
                latest.append(item)
        puts = unique_puts(series)
        jobs: list[Awaitable[None]] = [
            batch_write_all(self._call, self.table, list(chunk))
            for chunk in chunked(puts, WRITE_CHUNK)
        ]
        jobs += [self._put_latest(item) for item in newest_per_key(latest)]
        await _all(jobs)

    async def _put_latest(self, item: Item) -> None:
        try:
            await self._call(
                "PutItem",
                {
                    "TableName": self.table,
                    "Item": item_attrs(self.group(item.group), item),
                    "ConditionExpression": "attribute_not_exists(pk) OR #ver <= :ver",
                    "ExpressionAttributeNames": {"#ver": "ver"},
                    "ExpressionAttributeValues": {":ver": {"S": item.version}},
                },
            )
        except StoreError as exc:
            if _code(exc) != "ConditionalCheckFailedException":
                raise
            # a newer value is stored: nothing to do

    async def read(self, queries: Sequence[Query]) -> list[list[Record]]:
        latest_pks: dict[str, None] = {}
        series: dict[tuple[str, int, str, str], None] = {}
        plan: list[tuple[str, Any]] = []
        now = self.clock()
        for q in queries:
            group = self.group(q.group)
            pk = partition_key(q.group, q.id)
            if group.kind == "latest":
                latest_pks[pk] = None
                plan.append(("latest", pk))
            else:
                win = window(group, q, now)
                if win is None:  # also: BETWEEN rejects lo > hi
                    plan.append(("empty", None))
                    continue
                key = (pk, win.limit, win.low, win.high)
                series[key] = None
                plan.append(("series", key))

        pks = list(latest_pks)
        series_keys = list(series)
        jobs: list[Awaitable[Any]] = [
            batch_get_all(
                self._call,
                self.table,
                [{"pk": {"S": pk}, "sk": {"S": NULL_SK}} for pk in chunk],
                projection=_LATEST_PROJECTION,
                names={"#v": "v", "#ts": "ts", "#ver": "ver"},
                consistent=self.consistent_read,
            )
            for chunk in chunked(pks, READ_CHUNK)
        ]
        jobs += [self._query(*key) for key in series_keys]
        results = await _all(jobs)

        n_batches = len(jobs) - len(series_keys)
        by_pk: dict[str, Record] = {}
        for found in results[:n_batches]:
            for attrs in found:
                by_pk[attrs["pk"]["S"]] = record_of(attrs)
        by_series = dict(zip(series_keys, results[n_batches:], strict=True))

        out: list[list[Record]] = []
        for kind, key in plan:
            if kind == "latest":
                rec = by_pk.get(key)
                out.append([rec] if rec is not None else [])
            elif kind == "series":
                out.append(list(by_series[key]))
            else:
                out.append([])
        return out

    async def _query(self, pk: str, limit: int, lo: str, hi: str) -> list[Record]:
        """Newest-first items of one partition with lo <= sk <= hi, at most `limit`."""
        records: list[Record] = []
        start: dict[str, Any] | None = None
        while len(records) < limit:
            params: dict[str, Any] = {
                "TableName": self.table,
                "KeyConditionExpression": "pk = :pk AND #sk BETWEEN :lo AND :hi",
                "ExpressionAttributeNames": {"#sk": "sk", "#ts": "ts", "#v": "v"},
                "ExpressionAttributeValues": {":pk": {"S": pk}, ":lo": {"S": lo}, ":hi": {"S": hi}},
                "ProjectionExpression": _TS_PROJECTION,
                "ScanIndexForward": False,
                "Limit": limit - len(records),
                "ConsistentRead": self.consistent_read,
            }
            if start is not None:
                params["ExclusiveStartKey"] = start
            resp = await self._call("Query", params)
            records.extend(record_of(a) for a in resp.get("Items", []))
            start = resp.get("LastEvaluatedKey")
            if not start:  # a page stops at 1 MB; continue only when DynamoDB says so
                break
        return records


async def _local_credentials() -> Credentials:
    return Credentials("local", "local")


async def _endpoint_of(session: aioboto3.Session, region: str) -> str:
    """The endpoint botocore would use (AWS_ENDPOINT_URL_DYNAMODB, partitions, FIPS...),
    from a client made once for that and closed: the requests do not go through it."""
    async with session.client("dynamodb", region_name=region) as client:
        return str(client.meta.endpoint_url)


def _code(exc: BaseException) -> str | None:
    """The DynamoDB error code behind a StoreError raised by `_call`, if any."""
    cause = exc.__cause__
    return cause.code if isinstance(cause, DynamoWireError) else None

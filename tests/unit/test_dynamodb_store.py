"""Unit tests of the DynamoDB store's pure logic and retry loops, against tiny fakes."""

from __future__ import annotations

import base64
import random
from typing import Any

import aiohttp
import pytest

from featureplane.codec import make_item
from featureplane.errors import NotStartedError, StoreError, TransientStoreError
from featureplane.keys import NULL_SK, partition_key
from featureplane.stores.base import Query
from featureplane.stores.dynamodb import DynamoStore
from featureplane.stores.dynamodb_requests import (
    DynamoWireError,
    batch_get_all,
    batch_write_all,
    chunked,
    expiry_s,
    item_attrs,
    item_key,
    map_error,
    newest_per_key,
    record_of,
    unique_puts,
)
from tests.contract.conftest import CATALOG

T0 = 1_763_800_000_000
CLICKS = CATALOG.group("clicks")
PROFILE = CATALOG.group("profile")
AGED = CATALOG.group("aged")


def click(uid: str, ts: int, n: int, event: str | None = None) -> Any:
    return make_item(CLICKS, uid, ts, event or f"e{ts}-{n}", {"article_id": f"a{n}", "n": n})


def profile(uid: str, ts: int, event: str) -> Any:
    return make_item(PROFILE, uid, ts, event, {"updated_by": event})


def client_error(code: str, status: int = 400, message: str = "boom") -> DynamoWireError:
    return DynamoWireError(code, message, status)


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


# ---------------------------------------------------------------- pure logic


def test_chunked() -> None:
    assert [list(c) for c in chunked(list(range(7)), 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [list(c) for c in chunked(list(range(50)), 25)] == [list(range(25)), list(range(25, 50))]
    assert list(chunked([], 25)) == []
    with pytest.raises(ValueError):
        list(chunked([1], 0))


def test_unique_puts_keeps_the_last_of_each_key() -> None:
    puts = [(("p", "1"), "a"), (("p", "2"), "b"), (("p", "1"), "c"), (("q", "1"), "d")]
    assert unique_puts(puts) == ["b", "c", "d"]
    assert unique_puts([]) == []


def test_newest_per_key_picks_the_greatest_version() -> None:
    a_old, a_new = profile("a", T0, "x"), profile("a", T0 + 5, "y")
    tie1, tie2 = profile("b", T0, "event-a"), profile("b", T0, "event-b")
    got = newest_per_key([a_new, tie1, a_old, tie2])
    assert got == [a_new, max(tie1, tie2, key=lambda i: i.version)]
    replay = profile("a", T0 + 5, "y")  # the same event again: the later write wins
    assert newest_per_key([a_new, replay])[0] is replay
    assert newest_per_key([a_old, replay, a_new])[0] is a_new


def test_item_attrs_timeseries_round_trip() -> None:
    item = click("u#1", T0, 3)
    attrs = item_attrs(CLICKS, item)
    assert attrs["pk"] == {"S": partition_key("clicks", "u#1")}
    assert attrs["sk"] == {"S": item.version}
    assert "ver" not in attrs and "exp" not in attrs  # sk is the version; no retention
    assert item_key(CLICKS, item) == (attrs["pk"]["S"], attrs["sk"]["S"])
    assert attrs["v"] == {"B": base64.b64encode(item.value).decode()}  # B is base64 on the wire
    rec = record_of(attrs)
    assert (rec.ts, rec.version, rec.value) == (item.ts, item.version, item.value)


def test_item_attrs_latest_keeps_the_version() -> None:
    item = profile("u1", T0, "e")
    attrs = item_attrs(PROFILE, item)
    assert attrs["sk"] == {"S": NULL_SK}
    assert attrs["ver"] == {"S": item.version}
    assert "exp" not in attrs
    assert record_of(attrs).version == item.version


def test_expiry_is_epoch_seconds_rounded_up() -> None:
    hour = 3_600_000
    item = make_item(AGED, "u1", T0 + 1, "e", {"x": 1})
    assert item_attrs(AGED, item)["exp"] == {"N": str((T0 + hour) // 1000 + 1)}
    assert expiry_s(AGED, T0) == (T0 + hour) // 1000
    assert expiry_s(CLICKS, T0) is None
    assert expiry_s(PROFILE, T0) is None


def test_map_error() -> None:
    for code in [
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalServerError",
        "ServiceUnavailable",
    ]:
        err = map_error(client_error(code), "PutItem")
        assert isinstance(err, TransientStoreError), code
        assert code in str(err) and "PutItem" in str(err)
    assert isinstance(map_error(client_error("Weird", status=503), "Query"), TransientStoreError)
    bad = map_error(client_error("ValidationException"), "Query")
    assert type(bad) is StoreError and "ValidationException: boom" in str(bad)
    assert str(map_error(client_error("X", message=""), "Q")) == "DynamoDB Q failed: X"
    assert isinstance(
        map_error(client_error("CRC32Mismatch", status=200), "Q"), TransientStoreError
    )
    assert isinstance(map_error(aiohttp.ClientConnectionError("x"), "Q"), TransientStoreError)
    assert isinstance(map_error(aiohttp.ServerTimeoutError("x"), "Q"), TransientStoreError)
    assert isinstance(map_error(TimeoutError(), "Q"), TransientStoreError)
    assert type(map_error(RuntimeError("no"), "Q")) is StoreError


# ---------------------------------------------------------------- retry loops


class FlakyBatches:
    """A fake client `Call` that leaves the first item/key unprocessed `fail` times."""

    def __init__(self, fail: int, table: str = "t") -> None:
        self.fail, self.table = fail, table
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.stored: dict[str, Any] = {}

    async def __call__(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((op, params))
        req = params["RequestItems"][self.table]
        if op == "BatchWriteItem":
            done, left = (req[1:], req[:1]) if self.fail > 0 else (req, [])
            self.fail -= 1
            for r in done:
                self.stored[r["PutRequest"]["Item"]["pk"]["S"]] = r["PutRequest"]["Item"]
            return {"UnprocessedItems": {self.table: left} if left else {}}
        keys = req["Keys"]
        done_keys, left_keys = (keys[1:], keys[:1]) if self.fail > 0 else (keys, [])
        self.fail -= 1
        found = [self.stored[k["pk"]["S"]] for k in done_keys if k["pk"]["S"] in self.stored]
        unprocessed = {self.table: {**req, "Keys": left_keys}} if left_keys else {}
        return {"Responses": {self.table: found}, "UnprocessedKeys": unprocessed}


def puts(n: int) -> list[dict[str, Any]]:
    return [{"PutRequest": {"Item": {"pk": {"S": f"k{i}"}, "sk": {"S": "~"}}}} for i in range(n)]


async def test_batch_write_retries_unprocessed_items_with_backoff() -> None:
    fake, sleeps = FlakyBatches(fail=3), Sleeps()
    await batch_write_all(fake, "t", puts(5), sleep=sleeps, rand=random.Random(1))
    assert len(fake.calls) == 4
    # each retry sends only what was left unprocessed
    assert [len(c[1]["RequestItems"]["t"]) for c in fake.calls] == [5, 1, 1, 1]
    assert sorted(fake.stored) == [f"k{i}" for i in range(5)]
    # full jitter under a doubling ceiling: 25 ms, 50 ms, 100 ms
    assert len(sleeps.delays) == 3
    assert all(0 <= d <= 0.025 * 2**i for i, d in enumerate(sleeps.delays))


async def test_batch_write_gives_up_after_bounded_attempts() -> None:
    fake, sleeps = FlakyBatches(fail=100), Sleeps()
    with pytest.raises(TransientStoreError, match="1 items unprocessed after 4 attempts"):
        await batch_write_all(fake, "t", puts(3), attempts=4, sleep=sleeps)
    assert len(fake.calls) == 4 and len(sleeps.delays) == 3


async def test_batch_get_retries_unprocessed_keys() -> None:
    fake = FlakyBatches(fail=0)
    await batch_write_all(fake, "t", puts(4))
    fake.fail = 2
    keys = [{"pk": {"S": f"k{i}"}, "sk": {"S": "~"}} for i in range(6)]
    found = await batch_get_all(fake, "t", keys, projection="#v", names={"#v": "v"}, sleep=Sleeps())
    assert sorted(a["pk"]["S"] for a in found) == [f"k{i}" for i in range(4)]
    retry = fake.calls[-1][1]["RequestItems"]["t"]
    assert retry["ProjectionExpression"] == "#v" and len(retry["Keys"]) == 1
    fake.fail = 100
    with pytest.raises(TransientStoreError, match="keys unprocessed"):
        await batch_get_all(
            fake, "t", keys, projection="#v", names={"#v": "v"}, attempts=2, sleep=Sleeps()
        )


# ---------------------------------------------------------------- the store over a fake client


class FakeClient:
    """Just enough of `DynamoHttp` (its `call`) to check what the store sends."""

    def __init__(self) -> None:
        self.writes: list[list[dict[str, Any]]] = []
        self.puts: list[dict[str, Any]] = []
        self.gets: list[list[dict[str, Any]]] = []
        self.queries: list[dict[str, Any]] = []
        self.latest: dict[str, dict[str, Any]] = {}

    async def call(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        if op == "BatchWriteItem":
            self.writes.append(params["RequestItems"]["t"])
            return {"UnprocessedItems": {}}
        if op == "PutItem":
            item = params["Item"]
            cur = self.latest.get(item["pk"]["S"])
            if (
                cur is not None
                and cur["ver"]["S"] > params["ExpressionAttributeValues"][":ver"]["S"]
            ):
                wire = client_error("ConditionalCheckFailedException")
                raise map_error(wire, op) from wire  # as DynamoHttp.call raises it
            self.puts.append(params)
            self.latest[item["pk"]["S"]] = item
            return {}
        if op == "BatchGetItem":
            keys = params["RequestItems"]["t"]["Keys"]
            self.gets.append(keys)
            found = [self.latest[k["pk"]["S"]] for k in keys if k["pk"]["S"] in self.latest]
            return {"Responses": {"t": found}}
        assert op == "Query"
        self.queries.append(params)
        return {"Items": []}


def fake_store() -> tuple[DynamoStore, FakeClient]:
    store = DynamoStore(CATALOG, table="t", endpoint_url="http://unused")
    client = FakeClient()
    store._client = client  # type: ignore[assignment]
    return store, client


async def test_write_dedupes_and_chunks_by_25() -> None:
    store, client = fake_store()
    items = [click(f"u{i % 3}", T0 + i, i) for i in range(60)]
    await store.write(items + items[:10])  # replays inside one call
    assert sorted(len(w) for w in client.writes) == [10, 25, 25]
    keys = [
        (r["PutRequest"]["Item"]["pk"]["S"], r["PutRequest"]["Item"]["sk"]["S"])
        for w in client.writes
        for r in w
    ]
    assert len(keys) == len(set(keys)) == 60


async def test_latest_writes_send_only_the_newest_and_ignore_stale_conflicts() -> None:
    store, client = fake_store()
    await store.write([profile("u1", T0 + 9, "new")])
    await store.write(
        [profile("u1", T0 + i, f"e{i}") for i in range(5)]
        + [profile("u2", T0, "a"), profile("u2", T0 + 1, "b")]
    )
    sent = [(p["Item"]["pk"]["S"], p["Item"]["ts"]["N"]) for p in client.puts]
    assert sent == [("profile#u1", str(T0 + 9)), ("profile#u2", str(T0 + 1))]
    assert client.puts[0]["ConditionExpression"] == "attribute_not_exists(pk) OR #ver <= :ver"


async def test_read_dedupes_latest_keys_chunks_by_100_and_keeps_order() -> None:
    store, client = fake_store()
    await store.write([profile(f"u{i}", T0, f"e{i}") for i in range(0, 250, 2)])
    queries = [Query("profile", f"u{i}") for i in range(250)] + [Query("profile", "u0")] * 3
    got = await store.read(queries)
    assert sorted(len(k) for k in client.gets) == [50, 100, 100]
    assert [bool(r) for r in got] == [i % 2 == 0 for i in range(250)] + [True] * 3


async def test_read_clamps_timeseries_queries() -> None:
    store, client = fake_store()
    got = await store.read(
        [
            Query("clicks", "u1", limit=500),
            Query("clicks", "u1", limit=5, since=T0 + 10, until=T0),  # empty range: no request
            Query("clicks", "u1", limit=5, until=-1),
        ]
    )
    assert got == [[], [], []]
    assert len(client.queries) == 1
    q = client.queries[0]
    assert q["Limit"] == 50 and q["ScanIndexForward"] is False
    assert q["KeyConditionExpression"] == "pk = :pk AND #sk BETWEEN :lo AND :hi"


async def test_not_started_is_a_store_error() -> None:
    store = DynamoStore(CATALOG, table="t")
    with pytest.raises(StoreError, match="not started"):
        await store.read([Query("profile", "u1")])
    with pytest.raises(NotStartedError):  # not transient: retrying cannot start it
        await store.ping()


@pytest.fixture
def no_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> pytest.MonkeyPatch:
    """An environment where botocore finds no region or credentials (and asks no IMDS)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL_DYNAMODB"):
        monkeypatch.delenv(name, raising=False)
    for name in (
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


async def test_credentials_come_from_botocore_or_the_local_fallback(
    no_aws: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(StoreError, match="no AWS credentials"):
        await DynamoStore(CATALOG, table="t").start()  # AWS itself: no fallback

    endpoint, region, frozen = await DynamoStore(CATALOG, endpoint_url="http://e")._resolve()
    assert (endpoint, region) == ("http://e", "us-east-1")
    assert (await frozen()).access_key == "local"

    no_aws.setenv("AWS_ACCESS_KEY_ID", "AKID")
    no_aws.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    no_aws.setenv("AWS_SESSION_TOKEN", "tok")
    endpoint, region, frozen = await DynamoStore(
        CATALOG, endpoint_url="http://e", region="eu-west-1"
    )._resolve()
    creds = await frozen()
    assert (region, creds.access_key, creds.secret_key, creds.token) == (
        "eu-west-1",
        "AKID",
        "secret",
        "tok",
    )

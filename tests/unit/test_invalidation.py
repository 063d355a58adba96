"""Invalidation messages, the long local soft TTL, a subscriber's handling of messages,
and a writer whose publish fails (the write does not)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import orjson
import pytest

from featureplane.codec import make_item
from featureplane.invalidation import (
    MAX_MESSAGE_BYTES,
    InvalidMessageError,
    channel_of,
    decode,
    encode,
    local_groups,
    publisher_of,
)
from featureplane.operators.metrics import IngestMetrics
from featureplane.operators.write import Writer
from featureplane.serving.config import ServeConfig
from featureplane.serving.freshness import Entry, negative_entry
from featureplane.serving.invalidate import InvalidatedCache, Subscriber, local_tier
from featureplane.serving.local import LocalCache
from featureplane.serving.metrics import Metrics
from featureplane.spec import Catalog, load_catalog
from featureplane.stores.embedded import EmbeddedStore
from featureplane.stores.redis_cache import RedisCache
from tests.services import free_port

SPEC = """
feature_groups:
  - name: a
    entity: user
    kind: latest
    features: [{name: v, type: string}]
    tiers: [local, redis, store]
  - name: b
    entity: user
    kind: latest
    features: [{name: v, type: string}]
    tiers: [local, store]
  - name: c
    entity: user
    kind: latest
    features: [{name: v, type: string}]
    tiers: [redis, store]
"""


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    path = tmp_path_factory.mktemp("spec") / "groups.yaml"
    path.write_text(SPEC)
    return load_catalog(path)


def test_the_groups_with_a_local_tier(catalog: Catalog) -> None:
    assert local_groups(catalog) == {"a", "b"}
    assert channel_of("fp:") == b"fp:invalidate"


def test_a_message_names_its_keys_and_decoding_keeps_this_process_groups() -> None:
    [msg] = encode({"a": ["1", "2"], "b": ["é", ""], "zz": ["3"]})
    assert orjson.loads(msg) == {"a": ["1", "2"], "b": ["é", ""], "zz": ["3"]}
    assert decode(msg, frozenset({"a", "b"})) == [("a", "1"), ("a", "2"), ("b", "é"), ("b", "")]
    assert encode({}) == [] and encode({"a": []}) == []


def test_a_large_batch_is_split_under_the_bound() -> None:
    ids = [f"user-{n:08d}" for n in range(30_000)]
    msgs = encode({"a": ids[:20_000], "b": ids[20_000:]})
    assert len(msgs) > 1
    assert all(len(m) <= MAX_MESSAGE_BYTES for m in msgs)
    got = list(itertools.chain.from_iterable(decode(m, frozenset("ab")) for m in msgs))
    assert sorted(got) == sorted(
        [("a", i) for i in ids[:20_000]] + [("b", i) for i in ids[20_000:]]
    )


@pytest.mark.parametrize(
    "data",
    [
        "text, not bytes",
        None,
        b"",
        b"\xff\xfe",
        b"[]",
        b'"a"',
        b'{"a": "1"}',
        b'{"a": [1]}',
        b'{"a": [["1"]]}',
        b'{"a": ' * 50_000,
        b'{"a": ["' + b"x" * MAX_MESSAGE_BYTES + b'"]}',
    ],
)
def test_anything_else_is_refused(data: object) -> None:
    with pytest.raises(InvalidMessageError):
        decode(data, frozenset({"a"}))


def _entry(stored_at: int, soft_at: int, hard_at: int) -> Entry:
    return Entry((), True, stored_at, soft_at, hard_at)


def test_a_long_soft_ttl_only_while_subscribed_and_within_hard() -> None:
    local = InvalidatedCache(1 << 20, soft_ms=120_000)
    local.put(("a", "1"), _entry(1_000, 31_000, 301_000))
    assert local.get(("a", "1")) == _entry(1_000, 31_000, 301_000)  # unsubscribed: as given
    local.subscribed = True
    local.put(("a", "1"), _entry(1_000, 31_000, 301_000))
    assert local.get(("a", "1")) == _entry(1_000, 121_000, 301_000)
    local.put(("a", "2"), _entry(1_000, 31_000, 61_000))
    assert local.get(("a", "2")) == _entry(1_000, 61_000, 61_000)  # never past hard
    local.put(("a", "3"), _entry(1_000, 200_000, 301_000))
    assert local.get(("a", "3")) == _entry(1_000, 200_000, 301_000)  # never shortened
    neg = negative_entry(1_000, 5_000)
    local.put(("a", "4"), neg)
    assert local.get(("a", "4")) == neg  # a miss is remembered its own time
    token = local.token()
    local.invalidate([("a", "5")])
    local.put(("a", "5"), _entry(1_000, 31_000, 301_000), token)
    assert local.get(("a", "5")) is None  # the token rule still holds


def test_the_local_tier_config_asks_for(catalog: Catalog) -> None:
    redis = RedisCache(catalog, "redis://127.0.0.1:1/0")
    assert local_tier(ServeConfig(local_cache_mb=0), redis) is None
    assert type(local_tier(ServeConfig(), redis)) is LocalCache
    assert type(local_tier(ServeConfig(local_soft_ttl="2m"), None)) is LocalCache  # no channel
    long = local_tier(ServeConfig(local_soft_ttl="2m"), redis)
    assert isinstance(long, InvalidatedCache) and long.soft_ms == 120_000
    off = ServeConfig(local_soft_ttl="2m", invalidation="off")
    assert type(local_tier(off, redis)) is LocalCache


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def test_a_subscriber_drops_the_keys_a_message_names(catalog: Catalog) -> None:
    local, metrics = LocalCache(1 << 20), Metrics()
    sub = Subscriber(catalog, local, lambda: ["redis://127.0.0.1:1/0"], "fp:", metrics)
    for key in [("a", "1"), ("b", "2"), ("a", "3")]:
        local.put(key, _entry(0, 10, 20))
    [msg] = encode({"a": ["1"], "b": ["2"], "c": ["9"]})
    sub.handle(msg)
    assert local.get(("a", "1")) is None and local.get(("b", "2")) is None
    assert local.get(("a", "3")) is not None
    sub.handle(b"garbage")
    sub.handle(123)
    assert local.get(("a", "3")) is not None
    assert _sample(metrics, "featureplane_invalidation_messages_total", outcome="ok") == 1
    assert _sample(metrics, "featureplane_invalidation_messages_total", outcome="garbled") == 2
    assert _sample(metrics, "featureplane_invalidated_keys_total") == 2  # c is not local here


def test_no_publisher_without_redis_or_local_groups(catalog: Catalog, tmp_path: Path) -> None:
    assert publisher_of(catalog, None) is None
    assert publisher_of(catalog, object()) is None
    (tmp_path / "c.yaml").write_text(
        SPEC[: SPEC.index("  - name: a")] + SPEC[SPEC.index("  - name: c") :]
    )
    no_local = load_catalog(tmp_path / "c.yaml")
    assert list(no_local.groups) == ["c"]
    assert publisher_of(no_local, RedisCache(no_local, "redis://127.0.0.1:1/0")) is None
    p = publisher_of(catalog, RedisCache(catalog, "redis://127.0.0.1:1/0", prefix="x:"))
    assert p is not None and p.channel == b"x:invalidate"
    items = [make_item(catalog.group(g), i, 1, "e", {"v": "x"}) for g in "abc" for i in "112"]
    assert p.keys(items) == {"a": dict.fromkeys("12"), "b": dict.fromkeys("12")}


def test_a_failed_publish_never_fails_the_write(catalog: Catalog, tmp_path: Path) -> None:
    """Redis unreachable: group b (local, store) is written; the publish fails, counted."""
    metrics = IngestMetrics()
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def main() -> None:
        async with Writer(
            catalog, EmbeddedStore(catalog, tmp_path), RedisCache(catalog, url), metrics=metrics
        ) as writer:
            item = make_item(catalog.group("b"), "u1", 1, "e", {"v": "x"})
            await writer.write_items([item])

    asyncio.run(main())
    labels = {"flow": "ingest", "outcome": "failed"}
    assert metrics.value("featureplane_invalidations_published_total", labels) == 1

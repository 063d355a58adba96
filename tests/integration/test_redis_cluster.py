"""The Redis tier on a real 3-master Redis Cluster: batched reads across every master, a
slot migrated under a live client (ASK, then MOVED), scripts missing on one node, the
two ways of pointing at the wrong kind of server, and a master killed while a serving
app answers a stream of GETs. The cache rules themselves run on the cluster in
tests/contract/test_cache_contract.py."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from redis.crc import key_slot

from featureplane.cache import Cached, CacheFill
from featureplane.codec import Item, Record, make_item
from featureplane.errors import StoreError, TransientStoreError
from featureplane.serving.app import create_app
from featureplane.serving.config import ServeConfig
from featureplane.spec import Catalog, load_catalog
from featureplane.stores import _redis_lua as lua
from featureplane.stores.base import Query, wall_clock_ms
from featureplane.stores.embedded import EmbeddedStore
from featureplane.stores.redis import RedisStore
from featureplane.stores.redis_cache import RedisCache
from featureplane.stores.redis_layout import key_of
from tests.services import RedisClusterService, Service, running, start_redis_cluster

CATALOG = load_catalog(Path(__file__).parent.parent / "contract" / "catalog.yaml")
PROFILE, SMALL = CATALOG.group("profile"), CATALOG.group("small")
T0 = 1_763_800_000_000


def _cluster(
    node_timeout_ms: int = 2000, replicas: int = 0
) -> AbstractContextManager[RedisClusterService]:
    return running(lambda: start_redis_cluster(node_timeout_ms=node_timeout_ms, replicas=replicas))


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterService]:
    with _cluster() as svc:
        yield svc


@pytest.fixture
async def cache(cluster: RedisClusterService) -> AsyncIterator[RedisCache]:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    async with RedisCache(CATALOG, cluster.url, prefix=prefix, cluster=True) as c:
        yield c


def _rec(item: Item) -> Record:
    return Record(item.ts, item.version, item.value)


def _owners(cluster: RedisClusterService) -> dict[int, int]:
    """Slot -> port of the master that holds it, as the cluster says now."""
    with redis.Redis(port=cluster.nodes[0].port) as client:
        ranges = client.cluster("SLOTS")
    return {s: int(r[2][1]) for r in ranges for s in range(int(r[0]), int(r[1]) + 1)}


async def test_a_batch_over_every_master_answers_in_request_order(
    cache: RedisCache, cluster: RedisClusterService
) -> None:
    ids = [f"u{i}" for i in range(300)]
    owners = _owners(cluster)
    ports = {owners[key_slot(key_of(cache.prefix, "profile", i))] for i in ids}
    assert ports == {n.port for n in cluster.nodes}  # the batch spans all three masters
    items = {
        i: make_item(PROFILE, i, T0 + n, f"e{i}", {"updated_by": i}) for n, i in enumerate(ids)
    }
    series = {i: make_item(SMALL, i, T0 + n, f"s{i}", {"x": n}) for n, i in enumerate(ids)}
    # a third by fill, a third by write-through (timeseries keys exist from a fill), a third
    # left out (misses), and every tenth id a negative marker instead
    await cache.fill(
        [CacheFill("profile", i, [_rec(items[i])]) for i in ids[:100]]
        + [CacheFill("small", i, [_rec(series[i])]) for i in ids[:200]]
        + [CacheFill("profile", i, []) for i in ids[200::10]]
    )
    await cache.write_through([items[i] for i in ids[100:200]] + [series[i] for i in ids[100:200]])
    wanted = [(g, i) for i in reversed(ids) for g in ("small", "profile")]
    got = await cache.read_cached(wanted)
    assert len(got) == len(wanted)
    for (group, i), cached in zip(wanted, got, strict=True):
        n = ids.index(i)
        if group == "small":
            assert cached.records == ([_rec(series[i])] if n < 200 else []), (group, i)
        elif n < 200:
            assert cached.records == [_rec(items[i])] and cached.pttl, (group, i)
        else:
            assert cached.records == [] and (cached.negative_pttl is not None) == (n % 10 == 0)


async def test_the_redis_store_spreads_over_the_masters(cluster: RedisClusterService) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    async with RedisStore(CATALOG, cluster.url, prefix=prefix, cluster=True) as store:
        ids = [f"u{i}" for i in range(100)]
        await store.write(
            [make_item(SMALL, i, T0 + k, f"{i}-{k}", {"x": k}) for i in ids for k in (0, 1)]
        )
        got = await store.read([Query("small", i, limit=5) for i in ids])
    assert [[r.ts for r in recs] for recs in got] == [[T0 + 1, T0]] * len(ids)
    with redis.Redis(port=cluster.nodes[0].port) as client:  # one master holds only its share
        assert 0 < client.dbsize() < 2 * len(ids)


async def test_a_slot_migrated_under_a_live_client(
    cache: RedisCache, cluster: RedisClusterService
) -> None:
    """A slot moved to another master by hand (CLUSTER SETSLOT, MIGRATE), as resharding
    does, under a client whose slot map still names the old owner.

    Mid-migration, Redis answers TRYAGAIN to a command over several keys of the slot
    (a read names a pair's value key and marker) until the slot has moved: such reads
    fail as transient, after redis-py's retries, while other slots answer and one-key
    writes (a fill) follow ASK to the new owner. Once moved, MOVED updates the map and
    every call succeeds.
    """
    slot = key_slot(key_of(cache.prefix, "profile", "m0"))
    same: list[str] = []  # two more ids of m0's slot, so that it holds several keys
    n = 0
    while len(same) < 2:
        n += 1
        if key_slot(key_of(cache.prefix, "profile", f"x{n}")) == slot:
            same.append(f"x{n}")
    moving = [make_item(PROFILE, i, T0, i, {"updated_by": "a"}) for i in ("m0", *same)]
    other = make_item(PROFILE, "stay", T0, "stay", {"updated_by": "b"})
    assert key_slot(key_of(cache.prefix, "profile", "stay")) != slot
    await cache.fill([CacheFill("profile", it.id, [_rec(it)]) for it in [*moving, other]])
    ids = [("profile", it.id) for it in moving]
    got = await cache.read_cached([*ids, ("profile", "stay")])
    assert [c.records for c in got] == [[_rec(it)] for it in [*moving, other]]

    owners = _owners(cluster)
    source = next(n for n in cluster.nodes if n.port == owners[slot])
    target = next(n for n in cluster.nodes if n.port != owners[slot])
    src, dst = redis.Redis(port=source.port), redis.Redis(port=target.port)
    late = make_item(PROFILE, "m0", T0 + 5, "late", {"updated_by": "ask"})
    try:
        src_id, dst_id = src.cluster("MYID"), dst.cluster("MYID")
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
        assert len(keys) == len(moving)
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        started = time.monotonic()
        with pytest.raises(TransientStoreError, match=r"TTL exhausted|TRYAGAIN"):
            await cache.read_cached(ids)
        assert time.monotonic() - started < 3
        [kept] = await cache.read_cached([("profile", "stay")])
        assert kept.records == [_rec(other)]
        await cache.fill([CacheFill("profile", "m0", [_rec(late)])])  # ASK, then ASKING
        for node in cluster.nodes:
            with redis.Redis(port=node.port) as client:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    finally:
        src.close()
        dst.close()
    assert _owners(cluster)[slot] == target.port
    got = await cache.read_cached(ids)  # MOVED: the client learns the new owner
    assert [c.records for c in got] == [[_rec(late)], *([_rec(it)] for it in moving[1:])]
    newer = [make_item(PROFILE, it.id, T0 + 9, f"{it.id}9", {"updated_by": "c"}) for it in moving]
    await cache.write_through(newer)
    got = await cache.read_cached([*ids, ("profile", "stay")])
    assert [c.records for c in got] == [[_rec(it)] for it in [*newer, other]]


async def test_scripts_missing_on_one_master_are_loaded_again(
    cache: RedisCache, cluster: RedisClusterService
) -> None:
    """What a replica promoted by a failover looks like: a primary without the scripts."""
    ids = [f"u{i}" for i in range(60)]
    items = [make_item(PROFILE, i, T0, i, {"updated_by": i}) for i in ids]
    await cache.fill([CacheFill("profile", it.id, [_rec(it)]) for it in items])
    with redis.Redis(port=cluster.nodes[1].port) as node:
        node.script_flush()
    got = await cache.read_cached([("profile", i) for i in ids])
    assert [c.records for c in got] == [[_rec(it)] for it in items]
    with redis.Redis(port=cluster.nodes[1].port) as node:
        node.script_flush()
    await cache.write_through(items)  # the many-key write path reloads them too


async def test_the_wrong_kind_of_server_is_a_clear_error(
    cluster: RedisClusterService, redis_url: str
) -> None:
    with pytest.raises(StoreError, match="FEATUREPLANE_REDIS_CLUSTER=true"):
        await RedisCache(CATALOG, cluster.url).start()
    with pytest.raises(TransientStoreError, match="Cluster mode is not enabled"):
        await RedisCache(CATALOG, redis_url, cluster=True).start()
    with pytest.raises(StoreError, match="bad Redis Cluster URL"):
        await RedisCache(CATALOG, cluster.url.replace("/0", "/3"), cluster=True).start()


async def test_the_password_comes_from_the_url_and_a_wrong_one_is_not_transient(
    cluster: RedisClusterService,
) -> None:
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as client:
            client.config_set("requirepass", "s3cret")
    try:
        host = cluster.address
        async with RedisCache(CATALOG, f"redis://:s3cret@{host}/0", cluster=True) as cache:
            await cache.ping()
            assert await cache.read_cached([("profile", "u1")]) == [Cached([], None, None)]
        with pytest.raises(StoreError, match="invalid username-password") as info:
            await RedisCache(CATALOG, f"redis://:wrong@{host}/0", cluster=True).start()
        assert not isinstance(info.value, TransientStoreError)
    finally:
        for node in cluster.nodes:
            with redis.Redis(port=node.port, password="s3cret") as client:
                client.config_set("requirepass", "")


async def test_a_lost_master_is_transient_and_never_hangs() -> None:
    """Every call that needs the lost master fails as `TransientStoreError` within about
    a second (redis-py reloads the slot map and retries first), both while the master is
    merely unreachable and once the cluster has marked it failed (CLUSTERDOWN); until
    then, calls that need only the other masters still succeed."""
    with _cluster(node_timeout_ms=500) as svc:
        url = svc.url.replace("/0", "/0?socket_timeout=0.5&socket_connect_timeout=0.5")
        async with RedisCache(CATALOG, url, cluster=True) as cache:
            ids = [f"u{i}" for i in range(30)]  # over all three masters
            items = [make_item(PROFILE, i, T0, "e", {"updated_by": "a"}) for i in ids]
            await cache.write_through(items)
            lost = svc.nodes[2]
            alive = next(
                i for i in ids if _owners(svc)[key_slot(key_of("fp:", "profile", i))] != lost.port
            )
            lost.kill()
            [cached] = await cache.read_cached([("profile", alive)])
            assert cached.records
            for phase in ("unreachable", "clusterdown"):
                if phase == "clusterdown":
                    await _until_cluster_fails(svc)
                calls = {
                    "read": cache.read_cached([("profile", i) for i in ids]),
                    "write": cache.write_through(items),
                    "fill": cache.fill([CacheFill("profile", i, []) for i in ids]),
                    "ping": cache.ping(),
                }
                for name, call in calls.items():
                    started = time.monotonic()
                    with pytest.raises(TransientStoreError):
                        await call
                    assert time.monotonic() - started < 5, (phase, name)


async def _until_cluster_fails(svc: RedisClusterService) -> None:
    async with aioredis.Redis(port=svc.nodes[0].port) as client:
        for _ in range(100):
            if (await client.cluster("INFO"))["cluster_state"] == "fail":
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the cluster never noticed its lost master")


async def test_after_a_failover_the_promoted_replica_answers_with_its_scripts_loaded() -> None:
    """A master with a replica killed: calls fail as transient until the replica is promoted
    (MOVED then points at it); its first script call gets NOSCRIPT (Redis does not copy
    loaded scripts to replicas), the reload reaches it, and every id answers again."""
    with _cluster(node_timeout_ms=1000, replicas=1) as svc:
        async with RedisCache(CATALOG, svc.url, cluster=True) as cache:
            items = [make_item(PROFILE, f"u{i}", T0, "e", {"updated_by": "a"}) for i in range(60)]
            await cache.fill([CacheFill("profile", it.id, [_rec(it)]) for it in items])
            wanted = [("profile", it.id) for it in items]
            lost = svc.nodes[0]
            replica = next(n for n in svc.nodes if _master_of(n) == lost.port)
            with redis.Redis(port=replica.port) as client:
                assert client.script_exists(lua.CACHE_READ_SHA) == [False]
            # Replication is asynchronous: a master killed before its replica has the fill
            # loses it on failover, as Redis documents. Wait until the replica caught up.
            _wait_caught_up(lost, replica)
            lost.kill()
            deadline = time.monotonic() + 20
            while True:
                try:
                    got = await cache.read_cached(wanted)
                    break
                except TransientStoreError:
                    assert time.monotonic() < deadline, "no answer after the failover"
                    await asyncio.sleep(0.2)
            assert [c.records for c in got] == [[_rec(it)] for it in items]
            with redis.Redis(port=replica.port) as client:
                assert client.info("replication")["role"] == "master"
                assert client.script_exists(lua.CACHE_READ_SHA) == [True]


def _wait_caught_up(master: Service, replica: Service) -> None:
    with redis.Redis(port=master.port) as m, redis.Redis(port=replica.port) as r:
        wanted = m.info("replication")["master_repl_offset"]
        deadline = time.monotonic() + 10
        while r.info("replication")["slave_repl_offset"] < wanted:
            assert time.monotonic() < deadline, "the replica never caught up"
            time.sleep(0.05)


def _master_of(node: Service) -> int | None:
    with redis.Redis(port=node.port) as client:
        info = client.info("replication")
    return int(info["master_port"]) if info["role"] == "slave" else None


# ---------------------------------------------------------------- a master killed under load

NOW = wall_clock_ms() // 1000 * 1000  # the app judges retention by the wall clock


async def test_a_master_killed_under_load_serving_answers_from_the_store(tmp_path: Path) -> None:
    groups = {
        n: g.model_copy(update={"tiers": ("redis", "store")}) for n, g in CATALOG.groups.items()
    }
    catalog = Catalog(groups=groups)
    ids = [f"u{i}" for i in range(60)]
    items = [make_item(catalog.group("profile"), i, NOW, i, {"updated_by": i}) for i in ids]
    items += [
        make_item(catalog.group("small"), i, NOW - k, f"{i}{k}", {"x": k})
        for i in ids
        for k in range(3)
    ]
    async with EmbeddedStore(catalog, tmp_path) as store:
        await store.write(items)
    with _cluster(node_timeout_ms=1000) as svc:
        redis_cache = RedisCache(catalog, svc.url, cluster=True)
        app = create_app(
            catalog,
            store=EmbeddedStore(catalog, tmp_path),
            redis=redis_cache,
            config=ServeConfig(local_cache_mb=0),
            clock=lambda: NOW,
        )
        async with TestClient(TestServer(app)) as client:
            paths = [f"/v1/features/{g}/{i}?limit=5" for i in ids for g in ("profile", "small")]
            truth = {}
            for path in paths:  # the store answers, and the fill queue caches each answer
                resp = await client.get(path)
                assert resp.status == 200
                truth[path] = await resp.json()
            await _until_cached(redis_cache, ids)
            failures: list[str] = []
            served = 0
            stop = asyncio.Event()

            async def worker(seed: int) -> None:
                nonlocal served
                rng = random.Random(seed)
                while not stop.is_set():
                    path = rng.choice(paths)
                    resp = await client.get(path)
                    body = await resp.json()
                    served += 1
                    if resp.status != 200 or body != truth[path]:
                        failures.append(f"{path}: {resp.status} {body}")

            load = [asyncio.create_task(worker(n)) for n in range(8)]
            await asyncio.sleep(0.5)
            before = served
            svc.nodes[1].kill()  # SIGKILL: its third of the slots is gone, no replica
            await asyncio.sleep(1.0)
            at_fail = served
            await _until_cluster_fails(svc)
            await asyncio.sleep(1.5)  # CLUSTERDOWN everywhere now: store only
            stop.set()
            await asyncio.gather(*load)
            metrics = await (await client.get("/metrics")).text()
        assert not failures, failures[:5]
        assert before > 50 and at_fail > before and served > at_fail + 50
        assert _count(metrics, "featureplane_cache_events_total", 'tier="redis"', 'event="hit"') > 0
        assert _count(metrics, "featureplane_tier_errors_total", 'tier="redis"') > 0


async def _until_cached(cache: RedisCache, ids: list[str]) -> None:
    wanted = [(g, i) for i in ids for g in ("profile", "small")]
    for _ in range(100):
        got: list[Cached] = await cache.read_cached(wanted)
        if all(c.records for c in got):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the fill queue never cached the answers")


def _count(metrics: str, name: str, *labels: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total

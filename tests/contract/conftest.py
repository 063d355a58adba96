"""The fixtures of the contract suites: a store parametrised over every backend, and the
cache tier on a real redis-server and on a real 3-master Redis Cluster, all on an
injected clock."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from featureplane.spec import Catalog, load_catalog
from featureplane.stores._redis_conn import Client
from featureplane.stores.base import Store
from featureplane.stores.redis_cache import RedisCache
from tests.services import RedisClusterService, running, start_redis_cluster

CATALOG = load_catalog(Path(__file__).with_name("catalog.yaml"))
CACHE_CATALOG = Catalog(
    groups={**CATALOG.groups, **load_catalog(Path(__file__).with_name("cache_catalog.yaml")).groups}
)
"""The store contract's groups and the cache suite's own (cache_catalog.yaml)."""


class FakeClock:
    """Epoch-millisecond clock the tests move by hand."""

    def __init__(self, now: int = 1_763_800_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def _embedded(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[Catalog, FakeClock], Store]:
    from featureplane.stores.embedded import EmbeddedStore

    return lambda catalog, clock: EmbeddedStore(catalog, tmp_path / "data", clock=clock)


def _redis(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[Catalog, FakeClock], Store]:
    from featureplane.stores.redis import RedisStore

    url = request.getfixturevalue("redis_url")
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    return lambda catalog, clock: RedisStore(catalog, url, clock=clock, prefix=prefix)


def _redis_cluster(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[Catalog, FakeClock], Store]:
    from featureplane.stores.redis import RedisStore

    url = request.getfixturevalue("redis_cluster_url")
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    return lambda catalog, clock: RedisStore(catalog, url, clock=clock, prefix=prefix, cluster=True)


def _dynamodb(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[Catalog, FakeClock], Store]:
    from featureplane.stores.dynamodb import DynamoStore

    endpoint = request.getfixturevalue("dynamodb_endpoint")
    table = f"t{uuid.uuid4().hex[:12]}"
    return lambda catalog, clock: DynamoStore(
        catalog, table=table, endpoint_url=endpoint, region="us-east-1", clock=clock
    )


BACKENDS = {
    "embedded": _embedded,
    "redis": _redis,
    "redis-cluster": _redis_cluster,
    "dynamodb": _dynamodb,
}


@pytest.fixture(scope="session")
def redis_cluster_service() -> Iterator[RedisClusterService]:
    """A 3-master Redis Cluster for this session (a missing binary fails, never skips)."""
    with running(start_redis_cluster) as svc:
        yield svc


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster_service: RedisClusterService) -> str:
    return redis_cluster_service.url


@dataclass(frozen=True)
class RedisTarget:
    """Where the cache suite runs: a standalone redis-server or a Redis Cluster."""

    url: str
    cluster: bool

    def client(self) -> Client:
        """A plain client of the target, for a test to look at or tamper with keys."""
        if self.cluster:
            return RedisCluster.from_url(self.url)
        return aioredis.Redis.from_url(self.url)


@pytest.fixture(params=["standalone", "cluster"])
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    if request.param == "cluster":
        return RedisTarget(request.getfixturevalue("redis_cluster_url"), cluster=True)
    return RedisTarget(request.getfixturevalue("redis_url"), cluster=False)


@pytest.fixture
async def raw(redis_target: RedisTarget) -> AsyncIterator[Client]:
    client = redis_target.client()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=sorted(BACKENDS))
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[Catalog, FakeClock], Store]:
    return BACKENDS[request.param](tmp_path, request)


@pytest.fixture
async def store(
    make_store: Callable[[Catalog, FakeClock], Store], clock: FakeClock
) -> AsyncIterator[Store]:
    s = make_store(CATALOG, clock)
    await s.start()
    try:
        yield s
    finally:
        await s.aclose()


class FixedRand:
    """The TTL jitter draw, fixed by the test."""

    def __init__(self, value: float = 0.5) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


def computed(*_: object) -> None:
    """The on-demand function `cache_catalog.yaml` names; the cache never calls it."""
    raise AssertionError("on-demand groups are never cached")


@pytest.fixture
def rand() -> FixedRand:
    return FixedRand()


@pytest.fixture
def make_cache(redis_target: RedisTarget) -> Callable[[Catalog, FakeClock, FixedRand], RedisCache]:
    prefix = f"c{uuid.uuid4().hex[:8]}:"
    return lambda catalog, clock, rand: RedisCache(
        catalog,
        redis_target.url,
        clock=clock,
        prefix=prefix,
        rand=rand,
        cluster=redis_target.cluster,
    )


@pytest.fixture
async def cache(
    make_cache: Callable[[Catalog, FakeClock, FixedRand], RedisCache],
    clock: FakeClock,
    rand: FixedRand,
) -> AsyncIterator[RedisCache]:
    async with make_cache(CACHE_CATALOG, clock, rand) as c:
        yield c

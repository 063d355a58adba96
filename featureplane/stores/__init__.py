"""Store backends, chosen by `Settings.store` through an explicit mapping, and the cache tier."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from featureplane.settings import Settings
from featureplane.spec import Catalog
from featureplane.stores.base import Clock, Query, Store, wall_clock_ms

if TYPE_CHECKING:
    from featureplane.stores.redis_cache import RedisCache

__all__ = ["Query", "Store", "open_cache", "open_store"]


def _embedded(settings: Settings, catalog: Catalog, clock: Clock) -> Store:
    from featureplane.stores.embedded import EmbeddedStore

    return EmbeddedStore(catalog, settings.data_dir, clock=clock)


def _dynamodb(settings: Settings, catalog: Catalog, clock: Clock) -> Store:
    from featureplane.stores.dynamodb import DynamoStore

    return DynamoStore(
        catalog,
        table=settings.dynamodb_table,
        endpoint_url=settings.dynamodb_endpoint,
        region=settings.dynamodb_region,
        clock=clock,
    )


# Imports are deferred so that a process pays only for the backend it uses.
STORES: dict[str, Callable[[Settings, Catalog, Clock], Store]] = {
    "embedded": _embedded,
    "dynamodb": _dynamodb,
}


def open_store(settings: Settings, catalog: Catalog, clock: Clock = wall_clock_ms) -> Store:
    """The durable store the settings name (not started: `await store.start()`)."""
    return STORES[settings.store](settings, catalog, clock)


def open_cache(
    settings: Settings, catalog: Catalog, clock: Clock = wall_clock_ms
) -> RedisCache | None:
    """The Redis cache tier (not started), or None when no Redis URL is configured; a
    Redis Cluster client when `settings.redis_cluster`."""
    if settings.redis_url is None:
        return None
    from featureplane.stores.redis_cache import RedisCache

    url = settings.redis_url.get_secret_value()
    return RedisCache(catalog, url, clock=clock, cluster=settings.redis_cluster)

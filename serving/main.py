"""Run the HTTP feature server (CONTRACT section 3).

Reads go through each group's `tiers`, top first: an in-process LRU bounded by
bytes (`--local-cache-mb`), Redis (`FEATUREPLANE_REDIS_URL`; unset = no Redis
tier), then the durable store (`FEATUREPLANE_STORE`). Values past a group's
soft TTL are served and refreshed in the background; past its hard TTL never
served. Ids the store lacks are remembered for `--negative-ttl`. A tier that
fails or times out is skipped by its circuit breaker for a while; with Redis
down the store answers, with the store down cached values within hard TTL are
served and the rest get 503.

Security: set FEATUREPLANE_TOKEN to require `Authorization: Bearer <token>`
on /v1/* (environment only, never a flag, so it stays out of `ps`).
Every FEATUREPLANE_SERVE_* variable below is the flag's default.
SIGTERM or Ctrl-C stops accepting, finishes in-flight requests
(`--shutdown-timeout`) and closes every client.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
from typing import Any

from aiohttp import web

from featureplane.cli import add_spec_option, add_store_options, load_spec, settings_from
from featureplane.stores import open_redis, open_store
from featureplane.stores.redis import RedisStore
from serving.app import create_app
from serving.config import ServeConfig

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)

_SERVE_FLAGS = {
    "local_cache_mb": ("--local-cache-mb", int, "MiB of the in-process tier; 0 turns it off"),
    "negative_ttl": ("--negative-ttl", str, "how long a missing (group, id) is remembered "
                     "(e.g. 5s)"),
    "redis_timeout": ("--redis-timeout", str, "timeout of one Redis round trip (e.g. 100ms)"),
    "store_timeout": ("--store-timeout", str, "timeout of one store read (e.g. 1s)"),
    "breaker_failures": ("--breaker-failures", int, "consecutive failures that open a tier's "
                         "circuit breaker"),
    "breaker_cooldown": ("--breaker-cooldown", str, "how long an open breaker skips its tier "
                         "before a trial call (e.g. 2s)"),
    "xfetch_beta": ("--xfetch-beta", float, "XFetch early-refresh eagerness; 0 = off"),
    "shutdown_timeout": ("--shutdown-timeout", float, "seconds to finish in-flight requests "
                         "after SIGTERM"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_option(p)
    add_store_options(p)
    g = p.add_argument_group("http")
    g.add_argument("--host", help="address to listen on [FEATUREPLANE_HOST, 127.0.0.1]")
    g.add_argument("--port", type=int, help="port to listen on [FEATUREPLANE_PORT, 8000]")
    c = p.add_argument_group("cache and tiers")
    defaults = ServeConfig.model_fields
    for field, (flag, kind, text) in _SERVE_FLAGS.items():
        env = f"FEATUREPLANE_SERVE_{field.upper()}"
        c.add_argument(flag, dest=f"serve_{field}", type=kind,
                       help=f"{text} [{env}, {defaults[field].default}]")
    c.add_argument("--uvloop", dest="serve_uvloop", action="store_true", default=None,
                   help="run on uvloop [FEATUREPLANE_SERVE_UVLOOP, off]")


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    given: dict[str, Any] = {
        f: getattr(args, f"serve_{f}") for f in [*_SERVE_FLAGS, "uvloop"]
        if getattr(args, f"serve_{f}", None) is not None
    }
    config = ServeConfig(**given)
    catalog = load_spec(settings)
    redis = open_redis(settings, catalog)
    assert redis is None or isinstance(redis, RedisStore)
    app = create_app(
        catalog, store=open_store(settings, catalog), redis=redis, config=config,
        token=None if settings.token is None else settings.token.get_secret_value(),
    )
    loop = None
    if config.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
    # Start-up objects (modules, catalog, app) live for good: frozen, no full collection
    # walks them again; a large young generation makes collections rare. Full collections
    # over the heap were the p99 tail of bench/serve.py (b): 38-48 ms -> 14-18 ms.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 50)
    log.info("serving %d groups on http://%s:%d", len(catalog.groups), settings.host,
             settings.port)
    web.run_app(app, host=settings.host, port=settings.port, access_log=None,
                shutdown_timeout=config.shutdown_timeout, print=None, loop=loop)
    return 0

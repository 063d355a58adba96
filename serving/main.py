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

Hostile clients: a connection must send each request head within
`--header-timeout` (also the idle keep-alive time) and its body within
`--body-timeout`, or it is disconnected (408 for a late body); beyond
`--max-connections` open ones, new connections get a 503 and are closed.
These events are counted in /metrics and summarised in the log at most once a
minute per kind, never one line each.

SIGTERM: /readyz turns 503 while requests are still served for
`--drain-delay` (so load balancers stop sending), then the server stops
accepting, finishes in-flight requests (`--shutdown-timeout`) and closes
every client. Ctrl-C (SIGINT) does the same without the drain delay.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import socket
from typing import Any

from aiohttp import web

from featureplane.cli import add_spec_option, add_store_options, load_spec, settings_from
from featureplane.lifecycle import cannot_listen
from featureplane.serving.app import METRICS, READER, create_app, drain
from featureplane.serving.config import ServeConfig
from featureplane.serving.connections import ConnectionGuard, fit_to_fd_limit
from featureplane.stores import open_redis, open_store
from featureplane.stores.redis import RedisStore

__all__ = ["add_arguments", "run", "serve"]

_ACCEPT_BATCH = 64
_LISTEN_QUEUE = 4096  # the kernel caps it at net.core.somaxconn

log = logging.getLogger(__name__)

_SERVE_FLAGS = {
    "local_cache_mb": ("--local-cache-mb", int, "MiB of the in-process tier; 0 turns it off"),
    "negative_ttl": (
        "--negative-ttl",
        str,
        "how long a missing (group, id) is remembered (e.g. 5s)",
    ),
    "redis_timeout": ("--redis-timeout", str, "timeout of one Redis round trip (e.g. 100ms)"),
    "store_timeout": ("--store-timeout", str, "timeout of one store read (e.g. 1s)"),
    "breaker_failures": (
        "--breaker-failures",
        int,
        "consecutive failures that open a tier's circuit breaker",
    ),
    "breaker_cooldown": (
        "--breaker-cooldown",
        str,
        "how long an open breaker skips its tier before a trial call (e.g. 2s)",
    ),
    "xfetch_beta": ("--xfetch-beta", float, "XFetch early-refresh eagerness; 0 = off"),
    "shutdown_timeout": (
        "--shutdown-timeout",
        float,
        "seconds to finish in-flight requests after SIGTERM",
    ),
    "drain_delay": (
        "--drain-delay",
        float,
        "seconds /readyz answers 503 after SIGTERM before the server stops accepting",
    ),
    "header_timeout": (
        "--header-timeout",
        float,
        "seconds a connection has to send a request "
        "head, from opening or its previous answer (also the idle keep-alive)",
    ),
    "body_timeout": (
        "--body-timeout",
        float,
        "seconds a request has to send its body; later: 408 and disconnected",
    ),
    "max_connections": (
        "--max-connections",
        int,
        "open connections at most (fitted to the fd limit); beyond: 503 and closed",
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_option(p)
    add_store_options(p)
    g = p.add_argument_group("http")
    g.add_argument("--host", help="address to listen on [FEATUREPLANE_HOST, 127.0.0.1]")
    g.add_argument("--port", type=int, help="port to listen on [FEATUREPLANE_PORT, 8000]")
    c = p.add_argument_group("cache, tiers and connections")
    defaults = ServeConfig.model_fields
    for field, (flag, kind, text) in _SERVE_FLAGS.items():
        env = f"FEATUREPLANE_SERVE_{field.upper()}"
        c.add_argument(
            flag,
            dest=f"serve_{field}",
            type=kind,
            help=f"{text} [{env}, {defaults[field].default}]",
        )
    c.add_argument(
        "--uvloop",
        dest="serve_uvloop",
        action="store_true",
        default=None,
        help="run on uvloop [FEATUREPLANE_SERVE_UVLOOP, off]",
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    given: dict[str, Any] = {
        f: getattr(args, f"serve_{f}")
        for f in [*_SERVE_FLAGS, "uvloop"]
        if getattr(args, f"serve_{f}", None) is not None
    }
    config = ServeConfig(**given)
    catalog = load_spec(settings)
    redis = open_redis(settings, catalog)
    assert redis is None or isinstance(redis, RedisStore)
    app = create_app(
        catalog,
        store=open_store(settings, catalog),
        redis=redis,
        config=config,
        token=None if settings.token is None else settings.token.get_secret_value(),
    )
    # Start-up objects (modules, catalog, app) live for good: frozen, no full collection
    # walks them again; a large young generation makes collections rare. Full collections
    # over the heap were the p99 tail of bench/serve.py (b): 38-48 ms -> 14-18 ms.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 50)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[float] = loop.create_future()

        def on_signal(drain_delay: float) -> None:
            if not stop.done():
                stop.set_result(drain_delay)

        # SIGTERM comes from an orchestrator that must see /readyz fail before we stop
        # accepting; Ctrl-C comes from a person at a terminal, who wants it stopped now.
        loop.add_signal_handler(signal.SIGTERM, on_signal, config.drain_delay)
        loop.add_signal_handler(signal.SIGINT, on_signal, 0.0)
        await serve(app, config, settings.host, settings.port, stop)

    factory = None
    if config.uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, not yet listening: a port in use is reported before
    any tier is started, and no client connects until the app is ready."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise cannot_listen(
            host, port, "the HTTP API", "--host/--port or FEATUREPLANE_HOST/FEATUREPLANE_PORT", exc
        ) from None
    return sock


async def serve(
    app: web.Application, config: ServeConfig, host: str, port: int, stop: asyncio.Future[float]
) -> None:
    """Serve `app` on host:port until `stop` gives a drain delay: /readyz answers 503 for
    that many seconds while requests are still served, then the server shuts down.

    aiohttp's runner owns the app's life (start-up, shutdown, cleanup); the listening
    socket is ours, so each connection goes through `ConnectionGuard` (cap, timeouts).
    """
    sock = _bind(host, port)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=config.shutdown_timeout)
    try:
        await runner.setup()
        assert runner.server is not None
        guard = ConnectionGuard(
            runner.server, config, app[METRICS], fit_to_fd_limit(config.max_connections)
        )
        # asyncio accepts up to `backlog` connections per loop turn and sets them all up
        # before serving anyone else: 1,024 cost a probe ~150 ms in a 3,000-connection
        # storm. So accept in small batches, while the kernel queues a storm's worth.
        listener = await asyncio.get_running_loop().create_server(
            guard, sock=sock, backlog=_ACCEPT_BATCH
        )
        sock.listen(_LISTEN_QUEUE)
        log.info("serving %d groups on http://%s:%d", len(app[READER].catalog.groups), host, port)
        try:
            delay = await stop
            drain(app)
            await asyncio.sleep(delay)
        finally:
            listener.close()
    finally:
        sock.close()
        await runner.cleanup()

"""The `featureplane serve` process: the app on its tiers, bound, served until SIGTERM.

`run` opens the store and the Redis tier, builds the app, binds the port
(a taken one is a one-line `StartupError` before any tier starts) and serves
until SIGTERM or Ctrl-C. SIGTERM turns /readyz to 503 for the drain delay
while requests are still served, then the server stops accepting, finishes
in-flight requests and closes every client; Ctrl-C skips the drain delay.
The command line's `featureplane serve --help` describes the settings.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket

from aiohttp import web

from featureplane.lifecycle import cannot_listen
from featureplane.serving.app import METRICS, READER, create_app, drain
from featureplane.serving.config import ServeConfig
from featureplane.serving.connections import ConnectionGuard, fit_to_fd_limit
from featureplane.settings import Settings
from featureplane.spec import Catalog
from featureplane.stores import open_cache, open_store

__all__ = ["run", "serve"]

_ACCEPT_BATCH = 64
_LISTEN_QUEUE = 4096  # the kernel caps it at net.core.somaxconn

log = logging.getLogger(__name__)


def run(settings: Settings, catalog: Catalog, config: ServeConfig) -> int:
    """Serve `catalog` until SIGTERM or Ctrl-C; 0 after a graceful stop."""
    redis = open_cache(settings, catalog)
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

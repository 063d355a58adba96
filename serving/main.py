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
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from aiohttp import web

from featureplane.errors import FeatureplaneError
from featureplane.lifecycle import cannot_listen, check_port_free, die_with_parent
from featureplane.serving.app import METRICS, READER, create_app, drain
from featureplane.serving.catalog import CatalogParts
from featureplane.serving.config import ServeConfig
from featureplane.serving.connections import ConnectionGuard, fit_to_fd_limit
from featureplane.serving.metrics import Metrics, retire
from featureplane.serving.workers import Supervisor, available_cores
from featureplane.settings import Settings
from featureplane.spec import Catalog
from featureplane.stores import open_cache, open_store

__all__ = ["run", "serve"]

_ACCEPT_BATCH = 64
_LISTEN_QUEUE = 4096  # the kernel caps it at net.core.somaxconn
_FLUSH_S = 1.0
_CHANGE_PORT = "--host/--port or FEATUREPLANE_HOST/FEATUREPLANE_PORT"

log = logging.getLogger(__name__)


def run(
    settings: Settings,
    catalog: Catalog,
    config: ServeConfig,
    parts: CatalogParts | None = None,
) -> int:
    """Serve `catalog` until SIGTERM or Ctrl-C; 0 after a graceful stop. `parts`: what the
    catalog (/ui) reads beyond serving.

    One process, or with `config.workers` (default: the cores available) above 1, that
    many worker processes on the port under a supervisor (`featureplane.serving.workers`).
    """
    count, why = (config.workers, "--workers") if config.workers else available_cores()
    if count == 1:
        return _serve_process(settings, catalog, config, None, parts)
    return _supervise(settings, catalog, config, count, why, parts)


def _serve_process(
    settings: Settings,
    catalog: Catalog,
    config: ServeConfig,
    worker: _WorkerLink | None,
    parts: CatalogParts | None = None,
) -> int:
    """This process serves: its own tiers and clients, on the port (shared when a worker)."""
    redis = open_cache(settings, catalog)
    app = create_app(
        catalog,
        store=open_store(settings, catalog),
        redis=redis,
        config=config,
        token=None if settings.token is None else settings.token.get_secret_value(),
        catalog_parts=parts,
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
        if worker is None:
            await serve(app, config, settings.host, settings.port, stop)
            return
        for signum in worker.early_signals:  # came before the handlers above
            on_signal(config.drain_delay if signum == signal.SIGTERM else 0.0)
        metrics = app[METRICS]
        metrics.share(worker.metrics_dir, str(os.getpid()))
        flush = asyncio.create_task(_flush(metrics))
        try:
            await serve(
                app,
                config,
                settings.host,
                settings.port,
                stop,
                reuse_port=True,
                on_ready=worker.ready,
            )
        finally:
            flush.cancel()
            metrics.write_snapshot()
            # Stopping anyway: a signal forwarded now must not interrupt the report to the
            # supervisor (the loop's end would restore Python's KeyboardInterrupt).
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
                signal.signal(signum, signal.SIG_IGN)

    factory = None
    if config.uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    return 0


async def _flush(metrics: Metrics) -> None:
    """Write this worker's metrics for the others' scrapes once a second (its own scrapes
    write them too): a scrape on another worker sees this one's counts at most 1 s late."""
    while True:
        await asyncio.sleep(_FLUSH_S)
        metrics.write_snapshot()


@dataclass
class _WorkerLink:
    """What a worker process knows of its supervisor."""

    slot: int
    conn: Connection
    metrics_dir: Path
    early_signals: list[int]

    def ready(self) -> None:
        self.conn.send("ready")


def _supervise(
    settings: Settings,
    catalog: Catalog,
    config: ServeConfig,
    count: int,
    why: str,
    parts: CatalogParts | None = None,
) -> int:
    """Run `count` workers of this server on the port until SIGTERM or Ctrl-C."""
    host = settings.host
    check_port_free(host, settings.port, "the HTTP API", _CHANGE_PORT)
    # Held bound (not listening) while the server runs: it gets no connections, but keeps
    # the port ours between worker restarts and gives port 0 one number for every worker.
    reserved = _bind(host, settings.port, reuse_port=True)
    port = reserved.getsockname()[1]
    settings = settings.model_copy(update={"port": port})
    metrics_dir = Path(tempfile.mkdtemp(prefix="featureplane-serve-metrics-"))

    def body(slot: int, conn: Connection, early_signals: list[int]) -> None:
        link = _WorkerLink(slot, conn, metrics_dir, early_signals)
        _worker(link, settings, catalog, config, parts)

    supervisor = Supervisor(
        count=count,
        body=body,
        on_exit=lambda pid: retire(metrics_dir, str(pid)),
        stop_timeout=config.drain_delay + config.shutdown_timeout,
    )

    def ready(pids: list[int]) -> None:
        log.info(
            "serving %d groups on http://%s:%d with %d workers (%s; pids %s)",
            len(catalog.groups),
            host,
            port,
            count,
            why,
            " ".join(map(str, pids)),
        )

    try:
        return supervisor.run(ready)
    finally:
        reserved.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _worker(
    link: _WorkerLink,
    settings: Settings,
    catalog: Catalog,
    config: ServeConfig,
    parts: CatalogParts | None,
) -> None:
    """A worker process's body: serve; a start-up failure is one line to the supervisor
    (which prints the first one), never a traceback per worker."""
    slot, conn = link.slot, link.conn
    die_with_parent()
    _name_worker_logs(slot)
    try:
        code = _serve_process(settings, catalog, config, link, parts)
    except FeatureplaneError as exc:
        conn.send(("failed", str(exc)))
        sys.exit(1)
    except Exception as exc:  # every worker would print the same trace: -v shows it once
        log.debug("server worker %d failed", slot, exc_info=slot == 0)
        conn.send(("failed", f"server worker {slot} failed: {type(exc).__name__}: {exc}"))
        sys.exit(1)
    sys.exit(code)


def _name_worker_logs(slot: int) -> None:
    """Log lines of worker `slot` say so: `featureplane.serving.app[w1]: ...`."""
    make = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        rec = make(*args, **kwargs)
        rec.name = f"{rec.name}[w{slot}]"
        return rec

    logging.setLogRecordFactory(record)


def _bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A socket bound to host:port, not yet listening: a port in use is reported before
    any tier is started, and no client connects until the app is ready. With `reuse_port`
    the workers of one server share the port (SO_REUSEPORT)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise cannot_listen(host, port, "the HTTP API", _CHANGE_PORT, exc) from None
    return sock


async def serve(
    app: web.Application,
    config: ServeConfig,
    host: str,
    port: int,
    stop: asyncio.Future[float],
    *,
    reuse_port: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve `app` on host:port until `stop` gives a drain delay: /readyz answers 503 for
    that many seconds while requests are still served, then the server shuts down.
    `reuse_port`: share the port with the server's other workers; `on_ready` is called
    once the port listens (a worker tells its supervisor).

    aiohttp's runner owns the app's life (start-up, shutdown, cleanup); the listening
    socket is ours, so each connection goes through `ConnectionGuard` (cap, timeouts).
    """
    sock = _bind(host, port, reuse_port=reuse_port)
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
        if on_ready is None:
            groups = len(app[READER].catalog.groups)
            log.info("serving %d groups on http://%s:%d", groups, host, port)
        else:
            on_ready()
        try:
            delay = await stop
            drain(app)
            await asyncio.sleep(delay)
        finally:
            listener.close()
    finally:
        sock.close()
        await runner.cleanup()

"""The shard worker processes of `featureplane batch run`: start, listen, stop.

Workers are `multiprocessing` spawn processes running `run_shard`, the code path
of `featureplane load|backfill --shard I/N --at`: the settings and catalog go
over as objects (no second parse of flags, environment or spec), and counts
come back over a pipe as numbers, not as text to parse. A pipe per worker, so a
worker killed mid-write garbles nothing but its own. A worker told to stop gets
SIGTERM, and SIGKILL `STOP_GRACE_S` later; one whose runner dies gets SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featureplane.errors import FeatureplaneError
from featureplane.jobs import BatchJob
from featureplane.lifecycle import die_with_parent
from featureplane.settings import Settings
from featureplane.spec import Catalog

if TYPE_CHECKING:
    from featureplane.batch.shards import ShardResult

__all__ = ["STOP_GRACE_S", "ShardFn", "Worker", "Workers", "died"]

STOP_GRACE_S = 10.0
"""A worker told to stop (SIGTERM) is killed (SIGKILL) this long after."""
ShardFn = Callable[..., Coroutine[Any, Any, "ShardResult"]]


def _shard_process(
    conn: Connection,
    settings: Settings,
    catalog: Catalog,
    job: BatchJob,
    at_ms: int,
    shard: tuple[int, int],
    log_path: Path,
    run_shard: ShardFn,
) -> None:
    """A worker: one shard, its output to its log file, its counts to the runner."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides when shards stop
    die_with_parent()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{now} {job.name} shard {shard[0]}/{shard[1]}, pid {os.getpid()}")
    sys.stdout.flush()

    def report(done: int, rejected: int) -> None:
        conn.send(("progress", done, rejected))

    rejects = log_path.with_suffix(".rejects.jsonl")
    started = time.monotonic()  # after start-up and imports: the speed is the shard's own
    try:
        result = asyncio.run(run_shard(settings, catalog, job, at_ms, shard, report, rejects))
    except FeatureplaneError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        conn.send(("failed", str(exc)))
        sys.exit(1)
    except Exception as exc:  # any failure is the shard's reason; its trace goes to the log
        traceback.print_exc()
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    print(f"done: {result.done:,} written, {result.rejected:,} rejected, {result.work:,} units")
    conn.send(("done", result.done, result.rejected, result.work, time.monotonic() - started))


@dataclass(slots=True)
class Worker:
    """One shard's process, and what it has sent so far."""

    job: str
    shard: int
    process: BaseProcess
    conn: Connection | None
    log: Path
    started: float
    rows: int = 0
    rejected: int = 0
    result: tuple[int, int, int, float] | None = None
    """(rows, rejected, work, its own seconds) once it finished OK."""
    error: str | None = None
    stopping: str | None = None
    """Why the runner stopped it (a timeout, a signal); None while it runs its course."""
    term_at: float | None = None
    saved: float = 0.0
    """When the runner last recorded its counts."""

    def drain(self) -> None:
        """Take in what the worker sent; at end of pipe, close it."""
        assert self.conn is not None
        try:
            while self.conn.poll():
                msg: tuple[Any, ...] = self.conn.recv()
                if msg[0] == "progress":
                    self.rows += msg[1]
                    self.rejected += msg[2]
                elif msg[0] == "done":
                    self.result = (msg[1], msg[2], msg[3], msg[4])
                elif msg[0] == "failed":
                    self.error = msg[1]
        except (EOFError, OSError):
            self.conn.close()
            self.conn = None


class Workers:
    """The shard workers of one run running now; each logs to `<logs>/<job>.<I>.log`."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        at_ms: int,
        run_shard: ShardFn,
        logs: Path,
        clock: Callable[[], float],
    ) -> None:
        self.settings, self.catalog, self.at_ms, self.run_shard = (
            settings,
            catalog,
            at_ms,
            run_shard,
        )
        self.logs, self.clock = logs, clock
        self.ctx = multiprocessing.get_context("spawn")
        self.active: list[Worker] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, job: BatchJob, shard: tuple[int, int]) -> Worker:
        """Start shard `shard` (I, N) of `job`."""
        log_path = self.logs / f"{job.name}.{shard[0]}.log"
        reader, writer = self.ctx.Pipe(duplex=False)
        args = (writer, self.settings, self.catalog, job, self.at_ms, shard, log_path)
        process = self.ctx.Process(
            target=_shard_process,
            args=(*args, self.run_shard),
            name=f"{job.name}.{shard[0]}",
            daemon=True,  # never outlives the runner, whatever stops it
        )
        process.start()
        writer.close()  # the child holds the write end: EOF here once it exits
        worker = Worker(job.name, shard[0], process, reader, log_path, self.clock())
        self.active.append(worker)
        return worker

    def wait(self, timeout: float) -> Iterator[Worker]:
        """Take in what the workers sent for up to `timeout` s, and yield each that
        ended, joined and no longer active, before looking at the next one."""
        conns = [w.conn for w in self.active if w.conn is not None]
        ready = wait([*conns, *(w.process.sentinel for w in self.active)], timeout)
        for w in list(self.active):
            if w.conn is not None and w.conn in ready:
                w.drain()
            if w.process.sentinel in ready or not w.process.is_alive():
                if w.conn is not None:
                    w.drain()
                w.process.join()
                self.active.remove(w)
                yield w

    def stop(self, w: Worker, reason: str, now: float) -> None:
        """SIGTERM, for `reason`; `kill_overdue` kills it if it has not ended in time."""
        w.stopping, w.term_at = reason, now
        w.process.terminate()

    def stop_all(self, reason: str, now: float) -> None:
        for w in self.active:
            self.stop(w, reason, now)

    def kill_overdue(self, now: float) -> None:
        """SIGKILL the workers told to stop `STOP_GRACE_S` ago or more."""
        for w in self.active:
            if w.term_at is not None and now - w.term_at >= STOP_GRACE_S:
                w.process.kill()


def died(exitcode: int | None) -> str:
    """Why a worker that sent no result ended."""
    if exitcode is not None and exitcode < 0:
        return f"worker died ({signal.Signals(-exitcode).name})"
    return f"worker exited with status {exitcode} without a result"

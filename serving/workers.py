"""`featureplane serve --workers N`: N server processes on one port, and their supervisor.

Each worker is a forked copy of the supervisor (modules, catalog and settings already
loaded) that opens its own tiers and clients and listens on the port with SO_REUSEPORT,
so the kernel spreads connections over the workers with no hop between them. The
supervisor holds the port bound (not listening, so it gets no connections) for its whole
life: a port in use is a one-line error before any worker starts, and no other server can
take the port while a worker is being restarted.

Start-up: a worker reports "ready" once it listens, or its one-line failure; the first
failure stops the others and is the server's one error (exit 1), never N tracebacks.
Running: a worker that dies is restarted after a backoff (0.5 s doubling to 8 s), logged
in one line; more than `MAX_RESTARTS` in `RESTART_WINDOW_S` (a crash loop) stops the
server with exit 1, so the orchestrator sees it. Restarting rather than exiting keeps the
other workers' connections and the pod's readiness while one process is replaced.
Stopping: SIGTERM and SIGINT are forwarded to every worker, each drains as a single
process does; the supervisor exits 0 once all ended cleanly. Workers get SIGTERM if the
supervisor dies (`featureplane.lifecycle.die_with_parent`).

The default count is `available_cores()`: the CPUs of the process's affinity mask,
lowered to the cgroup CPU quota (rounded down, at least 1: a worker more than the quota
allows is throttled, which shows as p99 spikes), so a pod limited to 2 CPUs on a 64-core
node starts 2 workers. A pod with a CPU request and no limit sees every core of its node:
its manifest sets FEATUREPLANE_SERVE_WORKERS from the request (k8s/serve.yaml).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from featureplane.errors import StartupError

__all__ = [
    "MAX_RESTARTS",
    "RESTART_WINDOW_S",
    "Supervisor",
    "available_cores",
    "cgroup_cpu_limit",
]

log = logging.getLogger(__name__)

MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0
"""More restarts than this within the window: the server exits 1 (a crash loop)."""
_BACKOFF_S, _BACKOFF_CAP_S = 0.5, 8.0
_KILL_MARGIN_S = 5.0
WorkerMain = Callable[[int, Connection, list[int]], None]
"""A worker's body: its slot, the pipe it reports on ("ready", or ("failed", line)) and
the stop signals that came before it could handle them (appended to as they come)."""
_STOPS = {signal.SIGTERM, signal.SIGINT}


def available_cores() -> tuple[int, str]:
    """The worker count to default to, and why: CPU affinity, lowered to the cgroup quota."""
    try:
        count = len(os.sched_getaffinity(0))
        why = f"{count} CPUs in this process's affinity"
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
        why = f"{count} CPUs"
    limit = cgroup_cpu_limit()
    if limit is not None and limit < count:
        count = max(1, math.floor(limit))
        why = f"a cgroup CPU limit of {limit:g}"
    return count, why


def cgroup_cpu_limit(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> float | None:
    """The tightest CPU quota, in CPUs, of this process's cgroup and its parents (cgroup v2
    `cpu.max`, or v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`); None when unlimited or
    unreadable."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"
            for d in _up_from(root, path):
                limits.extend(_quota_v2(d / "cpu.max"))
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            for mount in (root / controllers, root / "cpu,cpuacct", root / "cpu"):
                for d in _up_from(mount, path):
                    limits.extend(_quota_v1(d))
    return min(limits, default=None)


def _up_from(mount: Path, path: str) -> list[Path]:
    """The cgroup's folder under `mount` and its parents up to `mount` (in a container the
    mount is often the container's own cgroup, and `path` names it from the host)."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _quota_v2(path: Path) -> list[float]:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return []
    return [] if quota == "max" else [int(quota) / int(period)]


def _quota_v1(folder: Path) -> list[float]:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return []
    return [quota / period] if quota > 0 and period > 0 else []


@dataclass(slots=True)
class _Worker:
    slot: int
    process: BaseProcess
    conn: Connection | None
    ready: bool = False


@dataclass
class Supervisor:
    """Runs `count` workers of `body` until SIGTERM/SIGINT; `run` returns the exit status.

    `on_exit(pid)` is told each worker that ended (the metrics keep its counts)."""

    count: int
    body: WorkerMain
    on_exit: Callable[[int], None]
    stop_timeout: float
    workers: dict[int, _Worker] = field(default_factory=dict)
    _restarts: deque[float] = field(default_factory=deque)
    _pending: dict[int, float] = field(default_factory=dict)  # slot -> restart time
    _stopping: signal.Signals | None = None
    _crashed: bool = False

    def run(self, on_ready: Callable[[list[int]], None]) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        old = signal.set_wakeup_fd(wake_w.fileno())
        handlers = {s: signal.signal(s, self._signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for slot in range(self.count):
                self._start(slot)
            self._await_ready(wake_r)
            if self._stopping is None:
                on_ready([w.process.pid or 0 for w in self.workers.values()])
                self._supervise(wake_r)
            return self._stop_all(wake_r)
        finally:
            signal.set_wakeup_fd(old)
            for s, h in handlers.items():
                signal.signal(s, h)
            wake_r.close()
            wake_w.close()

    def _signal(self, signum: int, frame: object) -> None:
        if self._stopping is None:
            self._stopping = signal.Signals(signum)
        for w in self.workers.values():  # forwarded at once: each worker drains itself
            if w.process.pid is not None and w.process.exitcode is None:
                os.kill(w.process.pid, signum)

    def _start(self, slot: int) -> None:
        ctx = multiprocessing.get_context("fork")
        reader, writer = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_child, args=(self.body, slot, writer), name=f"serve-{slot}", daemon=True
        )
        # Blocked across the fork: the child must never run the supervisor's handlers (a
        # SIGTERM there would be forwarded, not obeyed); it unblocks them once its own are in.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
        writer.close()
        self.workers[slot] = _Worker(slot, process, reader)

    def _await_ready(self, wake: socket.socket) -> None:
        """Until every worker listens; the first start-up failure is raised (the others
        are stopped first)."""
        while self._stopping is None and not all(w.ready for w in self.workers.values()):
            conns = [w.conn for w in self.workers.values() if w.conn is not None]
            sentinels = [w.process.sentinel for w in self.workers.values()]
            wait([wake, *conns, *sentinels], 1.0)
            _drain_wake(wake)
            for w in self.workers.values():
                failure = self._read(w)
                if failure is None and not w.ready and not w.process.is_alive():
                    failure = f"server worker {w.slot} {_ended(w.process.exitcode)} at start-up"
                if failure is not None:
                    # SIGINT: the others stop now, with no drain delay (nothing was served)
                    self._stopping = signal.SIGINT
                    self._signal(signal.SIGINT, None)
                    self._stop_all(wake, quiet=True)
                    raise StartupError(failure)

    def _read(self, w: _Worker) -> str | None:
        """Take in what the worker sent: set `ready`; a failure's line is returned."""
        if w.conn is None:
            return None
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg == "ready":
                    w.ready = True
                elif isinstance(msg, tuple) and msg[0] == "failed":
                    return str(msg[1])
        except (EOFError, OSError):
            w.conn.close()
            w.conn = None
        return None

    def _supervise(self, wake: socket.socket) -> None:
        while self._stopping is None:
            now = time.monotonic()
            due = min(self._pending.values(), default=now + 1.0)
            conns = [w.conn for w in self.workers.values() if w.conn is not None]
            sentinels = [w.process.sentinel for w in self.workers.values()]
            wait([wake, *conns, *sentinels], max(0.0, min(1.0, due - now)))
            _drain_wake(wake)
            if self._stopping is not None:
                return
            for slot, w in list(self.workers.items()):
                failure = self._read(w)
                if w.process.is_alive():
                    continue
                w.process.join()
                del self.workers[slot]
                self.on_exit(w.process.pid or 0)
                self._schedule_restart(w, failure)
            now = time.monotonic()
            for slot, at in list(self._pending.items()):
                if at <= now and self._stopping is None:
                    del self._pending[slot]
                    self._start(slot)

    def _schedule_restart(self, w: _Worker, failure: str | None) -> None:
        now = time.monotonic()
        while self._restarts and self._restarts[0] < now - RESTART_WINDOW_S:
            self._restarts.popleft()
        self._restarts.append(now)
        why = failure or _ended(w.process.exitcode)
        if len(self._restarts) > MAX_RESTARTS:
            log.error(
                "server worker %d (pid %s) %s; %d restarts within %gs: stopping the server",
                w.slot,
                w.process.pid,
                why,
                MAX_RESTARTS,
                RESTART_WINDOW_S,
            )
            self._stopping = signal.SIGTERM
            self._signal(signal.SIGTERM, None)
            self._crashed = True
            return
        delay = min(_BACKOFF_CAP_S, _BACKOFF_S * 2 ** (len(self._restarts) - 1))
        log.warning(
            "server worker %d (pid %s) %s; restarting it in %gs (%d restart(s) in the last "
            "%gs; the other workers keep serving)",
            w.slot,
            w.process.pid,
            why,
            delay,
            len(self._restarts),
            RESTART_WINDOW_S,
        )
        self._pending[w.slot] = now + delay

    def _stop_all(self, wake: socket.socket, *, quiet: bool = False) -> int:
        """Wait for the workers told to stop; kill those still running after the timeout.
        0 when every worker ended cleanly (and none crash-looped); `quiet`: their ends
        are not logged (a failed start, whose one error is the first worker's)."""
        deadline = time.monotonic() + self.stop_timeout + _KILL_MARGIN_S
        status = 1 if self._crashed else 0
        while self.workers:
            sentinels = [w.process.sentinel for w in self.workers.values()]
            wait([wake, *sentinels], max(0.0, min(1.0, deadline - time.monotonic())))
            _drain_wake(wake)
            for slot, w in list(self.workers.items()):
                if w.process.is_alive():
                    if time.monotonic() >= deadline:
                        log.error("server worker %d did not stop in time: killed", slot)
                        w.process.kill()
                        status = 1
                    continue
                w.process.join()
                del self.workers[slot]
                self.on_exit(w.process.pid or 0)
                code = w.process.exitcode
                if code not in (0, -signal.SIGTERM, -signal.SIGINT) and not quiet:
                    log.error("server worker %d (pid %s) %s", slot, w.process.pid, _ended(code))
                    status = 1
        return status


def _child(body: WorkerMain, slot: int, conn: Connection) -> None:
    """A worker process: stop signals recorded until its event loop handles them."""
    early: list[int] = []
    for signum in _STOPS:
        signal.signal(signum, lambda n, _f: early.append(n))
    signal.set_wakeup_fd(-1)  # the supervisor's, inherited
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
    body(slot, conn, early)


def _drain_wake(wake: socket.socket) -> None:
    wake.setblocking(False)
    try:
        while wake.recv(64):
            pass
    except BlockingIOError:
        pass


def _ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"

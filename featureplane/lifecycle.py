"""Start-up checks and graceful stop of the long-running commands (up, ingest, retry).

`install_stop_handlers()` runs first thing in the `featureplane` command, before
the slow imports, so a SIGTERM at any moment of start-up is a clean stop:
it only sets `STOP`, and each command checks it between its start-up steps
and while it runs. The checks find what would make a start fail (a port
already taken, a broker that does not answer) before anything is started,
and say in one line what to change. Their failures are `StartupError`s, which
the CLI prints without a traceback; so is a Kafka call that fails
(`broker_error`).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
from types import FrameType

from featureplane.errors import StartupError

__all__ = [
    "STOP",
    "broker_error",
    "cannot_listen",
    "check_kafka_reachable",
    "check_port_free",
    "die_with_parent",
    "install_stop_handlers",
]

log = logging.getLogger(__name__)

STOP = threading.Event()
"""Set by the first SIGTERM or SIGINT: stop reading, drain, commit and exit 0."""


def install_stop_handlers() -> None:
    """First SIGTERM or SIGINT: set STOP; a second SIGINT: KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if STOP.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.info("%s: stopping gracefully", signal.Signals(signum).name)
        STOP.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def die_with_parent() -> None:
    """On Linux, this `multiprocessing` child gets SIGTERM when its parent dies, even by
    SIGKILL or the OOM killer, instead of working on unwatched (a batch shard, a server
    worker)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    parent = multiprocessing.parent_process()
    # The parent died before the call above: this process was handed to another. (Not
    # "ppid is 1": in a container the parent often *is* pid 1.)
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


def cannot_listen(host: str, port: int, what: str, change: str, exc: OSError) -> StartupError:
    """The one-line error for a port this process cannot listen on."""
    if exc.errno == errno.EADDRINUSE:
        return StartupError(
            f"port {port} ({what}, {host}:{port}) is already in use: "
            f"another process listens there; choose another with {change}"
        )
    return StartupError(
        f"cannot listen on {host}:{port} ({what}): {exc.strerror or exc}; change it with {change}"
    )


def broker_error(bootstrap: str, doing: str, exc: BaseException) -> StartupError:
    """The one-line error for a Kafka call that failed: what it did, where, and why.

    `exc` is a confluent_kafka KafkaException (its first argument a KafkaError
    whose `str()` is librdkafka's reason) or any other exception of a Kafka call.
    """
    err: object = exc.args[0] if exc.args else exc
    describe = getattr(err, "str", None)  # KafkaError.str(): librdkafka's reason alone
    reason = str(describe() if callable(describe) else err)
    if not reason:
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
    return StartupError(f"cannot {doing} on Kafka at {bootstrap}: {reason}")


def check_port_free(host: str, port: int, what: str, change: str) -> None:
    """Raise StartupError unless a server could listen on host:port now (0 is always free)."""
    if port == 0:
        return
    try:
        addrs = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise cannot_listen(host, port, what, change, OSError(exc.errno, exc.strerror)) from None
    for family, kind, proto, _, addr in addrs:
        with socket.socket(family, kind, proto) as s:
            # As the servers do: a port left in TIME_WAIT by a stopped server is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                raise cannot_listen(host, port, what, change, exc) from None


def check_kafka_reachable(bootstrap: str, timeout_s: float = 5.0) -> None:
    """Raise StartupError unless some bootstrap server accepts a TCP connection.

    librdkafka would retry a dead address quietly for its whole timeout and
    print a line every 50 ms on stderr; one connection attempt says it at once.
    """
    problems: list[str] = []
    for server in bootstrap.split(","):
        host, port = _host_port(server)
        if port is None:
            problems.append(f"{server.strip()!r} is not HOST:PORT")
            continue
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            problems.append(f"{host}:{port}: {reason}")
    raise StartupError(
        f"cannot reach Kafka at {bootstrap} ({'; '.join(problems)}): start the broker, "
        "or point --bootstrap / FEATUREPLANE_KAFKA_BOOTSTRAP at one that runs"
    )


def _host_port(server: str) -> tuple[str, int | None]:
    """'host:port', 'SSL://host:port' or '[::1]:port' -> (host, port); port None if absent."""
    server = server.strip().rpartition("://")[2]
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        return server, None
    return host.strip("[]"), int(port)

"""Start the local stand-ins for Redis, DynamoDB and S3 (and the broker) for tests and benches.

Each service gets a free loopback port and its own directory; `stop()` ends
it. Run `python -m tests.services` to start them by hand.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from featureplane.cli.broker import (
    REPO,
    Service,
    ServiceError,
    find_binary,
    free_port,
    start_process,
    start_tansu,
)

__all__ = [
    "REPO",
    "Service",
    "ServiceError",
    "find_binary",
    "free_port",
    "start_dynalite",
    "start_moto",
    "start_redis",
    "start_tansu",
]


def start_redis(port: int | None = None, workdir: Path | None = None) -> Service:
    port = port or free_port()
    argv = [
        find_binary("redis-server"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    return start_process("redis", argv, port, workdir, 20)


def start_dynalite(port: int | None = None, workdir: Path | None = None) -> Service:
    port = port or free_port()
    wd = workdir or Path(tempfile.mkdtemp(prefix="fp-dynalite-"))
    argv = [
        find_binary("dynalite"),
        "--port",
        str(port),
        "--path",
        str(wd / "db"),
        "--createTableMs",
        "0",
        "--deleteTableMs",
        "0",
        "--updateTableMs",
        "0",
    ]
    svc = start_process("dynalite", argv, port, wd, 30)
    svc.own_dir = workdir is None
    return svc


def start_moto(port: int | None = None) -> Service:
    """An S3 (and more) API on loopback, for `load s3://...` tests."""
    port = port or free_port()
    argv = [find_binary("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    return start_process("moto", argv, port, None, 30)


if __name__ == "__main__":  # pragma: no cover - manual helper: python -m tests.services
    services = [start_redis(), start_dynalite(), start_tansu()]
    for s in services:
        print(f"{s.name}: {s.address} (log {s.log})")
    try:
        input("press Enter to stop\n")
    finally:
        for s in services:
            s.cleanup()
    sys.exit(0)

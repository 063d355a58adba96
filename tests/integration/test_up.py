"""`featureplane up --demo` as a new user runs it: ready, features grow, SIGTERM leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from featureplane.cli.up import (
    DEMO_GROUP,
    DRAIN,
    UpSettings,
    banner,
    plan_children,
    stop_timeout,
    wrote_items,
)
from featureplane.settings import Settings
from featureplane.spec import load_catalog, parse_duration
from tests.services import free_port

GROUP = "recent_user_clicked_fleaMarketArticles"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, grandchildren, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _metrics_port(log: Path) -> int:
    m = re.search(r"Prometheus metrics on [\d.]+:(\d+)/metrics", log.read_text())
    assert m, log.read_text()
    return int(m.group(1))


def _listening(port: int) -> list[str]:
    """Addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                if len(addr) == 8:
                    found.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                else:
                    found.append(table + ":" + addr)
    return found


def _start_up(tmp_path: Path, port: int, *flags: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREPLANE_")}
    argv = [
        sys.executable,
        "-m",
        "featureplane.cli",
        "up",
        *flags,
        "--data-dir",
        str(tmp_path / "data"),
        "--port",
        str(port),
    ]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_ready(proc: subprocess.Popen[str], base: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if _get(f"{base}/readyz")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "up never became ready"
        time.sleep(0.5)


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_up_demo_serves_growing_features_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start_up(tmp_path, port, "--demo", "--rate", "200")
    try:
        _wait_ready(proc, base)
        # Once the banner is printed, the curl it suggests finds user-1's clicks at once.
        assert proc.stdout is not None
        shown = ""
        while not shown.endswith("Ctrl-C stops everything.\n"):
            line = proc.stdout.readline()
            assert line, f"up ended before its banner:\n{shown}"
            shown += line
        assert "featureplane is up" in shown and f"'{base}/v1/features/{GROUP}/user-1" in shown
        status, body = _get(f"{base}/v1/features/{GROUP}/user-1?limit=3")
        assert status == 200 and body["found"], body
        # The demo feeds user-1 about 10 clicks a second: newer items must keep appearing.
        newest: list[int] = []
        deadline = time.monotonic() + 60
        while len(newest) < 2 or newest[-1] <= newest[0]:
            status, body = _get(f"{base}/v1/features/{GROUP}/user-1?limit=50")
            assert status == 200, body
            if body["found"]:
                assert 1 <= len(body["items"]) <= 50
                assert set(body["items"][0]["features"]) == {"article_id", "session_id", "category"}
                newest.append(body["items"][0]["ts"])
            assert time.monotonic() < deadline, f"no new features in 60 s: newest ts {newest}"
            time.sleep(1)
        status, body = _get(f"{base}/v1/groups")
        assert status == 200
        # The catalog reads the dataflows' metrics pages that up hands it: a live freshness.
        assert f"{base}/ui" in shown
        with urllib.request.urlopen(f"{base}/ui/part/groups/{GROUP}", timeout=10) as resp:
            page = resp.read().decode()
        assert "The article clicked." in page and "Unavailable:" not in page, page
        assert re.search(r'id="freshness-p50">\d+(\.\d+)? (ms|s)<', page), page
        children = _descendants(proc.pid)
        assert len(children) >= 4  # broker, ingest, retry, serve, demo feeder
        # The dataflows' metrics are for this machine only.
        logs = tmp_path / "data" / "logs"
        for flow in ("ingest", "retry"):
            mport = _metrics_port(logs / f"{flow}.log")
            assert _listening(mport) == ["127.0.0.1"], f"{flow} metrics on {_listening(mport)}"
    finally:
        out = _stop(proc)
    # A graceful stop: every dataflow drained and committed, none was killed.
    assert "did not stop in time" not in out, out
    for flow in ("ingest", "retry"):
        assert f"{flow}: stopped after" in (logs / f"{flow}.log").read_text(), flow
    time.sleep(0.5)
    left = [p for p in children if _alive(p)]
    assert not left, f"processes left behind: {left}"

    # The embedded store keeps its data across a restart of `up` (no demo feed this time).
    proc = _start_up(tmp_path, port, "--spec", str(EXAMPLES))
    try:
        _wait_ready(proc, base)
        status, body = _get(f"{base}/v1/features/{GROUP}/user-1?limit=50")
        assert status == 200 and body["found"], body
        assert body["items"][0]["ts"] >= newest[-1]
    finally:
        _stop(proc)


def test_up_help_explains() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "featureplane.cli", "up", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--demo" in out and "FEATUREPLANE_DATA_DIR" in out


def test_up_stop_timeout_outlasts_the_dataflows_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under up a dataflow drains for DRAIN and then closes: up must not SIGKILL it before."""
    monkeypatch.delenv("FEATUREPLANE_DRAIN_TIMEOUT", raising=False)
    monkeypatch.delenv("FEATUREPLANE_METRICS_HOST", raising=False)
    settings = Settings(spec=tmp_path / "spec", data_dir=tmp_path)
    children = plan_children(settings, UpSettings(), "127.0.0.1:9092")
    for child in children:
        if child.name in ("ingest", "retry"):
            assert child.env["FEATUREPLANE_DRAIN_TIMEOUT"] == DRAIN
            assert child.env["FEATUREPLANE_METRICS_HOST"] == "127.0.0.1"
    drain_s = parse_duration(DRAIN) / 1000
    assert stop_timeout(drain_s) >= drain_s + 15
    assert stop_timeout(60.0) > 60.0  # a longer FEATUREPLANE_DRAIN_TIMEOUT moves it too


def test_up_passes_its_settings_to_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain timeout in bare milliseconds is a duration like any other; host and port
    given as flags reach the server; the demo feeder runs only with a rate."""
    monkeypatch.setenv("FEATUREPLANE_DRAIN_TIMEOUT", "60000")
    up = UpSettings()
    assert up.drain_timeout == 60_000
    settings = Settings(spec=tmp_path / "spec", data_dir=tmp_path, host="127.0.0.2", port=8123)
    children = {c.name: c for c in plan_children(settings, up, "127.0.0.1:9092", 7.5)}
    assert children["ingest"].env["FEATUREPLANE_DRAIN_TIMEOUT"] == "1m"
    assert children["serve"].env["FEATUREPLANE_PORT"] == "8123"
    assert children["serve"].ready_url == "http://127.0.0.2:8123/readyz"
    assert children["demo-events"].argv[-2:] == ["--rate", "7.5"]
    assert "demo-events" not in {c.name for c in plan_children(settings, up, "127.0.0.1:9092")}


def test_the_banner_suggests_a_curl_that_any_shell_runs(tmp_path: Path) -> None:
    """The URL is quoted (zsh refuses an unquoted `?` that matches no file), and without the
    demo it names no group of the example catalog, which the user's own may lack."""
    settings = Settings(spec=tmp_path / "spec", data_dir=tmp_path, port=8123)
    children = plan_children(settings, UpSettings(), "127.0.0.1:9092", 7.5)
    text = banner(children, tmp_path, "127.0.0.1:9092", True, False, demo=True)
    url = f"http://127.0.0.1:8123/v1/features/{DEMO_GROUP}/user-1?limit=3"
    assert f"\n  curl -s '{url}'\n" in text
    text = banner(children, tmp_path, "127.0.0.1:9092", True, False)
    assert "\n  curl -s 'http://127.0.0.1:8123/v1/groups'\n" in text
    assert DEMO_GROUP not in text
    assert DEMO_GROUP in load_catalog(EXAMPLES).groups


def test_with_the_demo_ingest_is_ready_once_it_wrote_items(tmp_path: Path) -> None:
    settings = Settings(spec=tmp_path / "spec", data_dir=tmp_path)
    demo = {c.name: c for c in plan_children(settings, UpSettings(), "127.0.0.1:9092", 5.0)}
    assert demo["ingest"].ready_when is wrote_items
    assert demo["retry"].ready_when is None  # its topics stay empty unless something fails
    plain = {c.name: c for c in plan_children(settings, UpSettings(), "127.0.0.1:9092")}
    assert plain["ingest"].ready_when is None  # the user's topics may be empty
    head = (
        b"# HELP featureplane_ingest_items_written_total Items written\n"
        b"# TYPE featureplane_ingest_items_written_total counter\n"
    )
    assert not wrote_items(head)
    line = b'featureplane_ingest_items_written_total{flow="ingest",group="g",tier="store"} '
    assert not wrote_items(head + line + b"0.0\n")
    assert wrote_items(head + line + b"0.0\n" + line.replace(b'"g"', b'"h"') + b"83.0\n")

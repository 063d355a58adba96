"""schemathesis against a real `featureplane serve` process: no 5xx for any generated input."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.services import free_port

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    env = {
        **os.environ,
        "FEATUREPLANE_SPEC": str(REPO / "examples"),
        "FEATUREPLANE_DATA_DIR": str(tmp_path),
        "FEATUREPLANE_REDIS_URL": redis_url,
        "FEATUREPLANE_PORT": str(port),
        "FEATUREPLANE_TOKEN": "tok",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "featureplane.cli", "serve"],
        env=env,
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{base}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "100",
                "--seed",
                "1",
                "-H",
                "Authorization: Bearer tok",
                "--phases",
                "examples,coverage,fuzzing",
            ],
            capture_output=True,
            text=True,
            timeout=150,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        print(run.stdout[-1500:])
    finally:
        server.terminate()
        _, err = server.communicate(timeout=15)
    assert server.returncode == 0, err.decode()[-2000:]  # SIGTERM is a graceful stop

"""A missing service binary is an error that says how to install it, never a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from featureplane.cli import broker
from tests import services


def test_missing_binary_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(broker, "REPO", tmp_path)
    with pytest.raises(services.ServiceError, match="apt-get install -y redis-server"):
        services.find_binary("redis-server")
    with pytest.raises(services.ServiceError, match="dynalite@4"):
        services.find_binary("dynalite")


def test_started_service_listens_and_stops() -> None:
    svc = services.start_redis()
    try:
        assert svc.alive() and svc.port > 0
    finally:
        svc.cleanup()
    assert not svc.alive() and not svc.workdir.exists()

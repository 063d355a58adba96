"""A missing service binary is an error that says how to install it, never a skip."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

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


def test_a_cluster_without_redis_cli_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = tmp_path / "redis-server"  # found, but no redis-cli beside it or on PATH
    server.write_text("#!/bin/sh\nexit 1\n")
    server.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(services.ServiceError, match="apt-get install -y redis-tools"):
        services.start_redis_cluster()


def test_started_service_listens_and_stops() -> None:
    svc = services.start_redis()
    try:
        assert svc.alive() and svc.port > 0
    finally:
        svc.cleanup()
    assert not svc.alive() and not svc.workdir.exists()


def test_started_cluster_is_ok_on_every_node_and_stops() -> None:
    cluster = services.start_redis_cluster()
    try:
        assert cluster.alive() and len(cluster.nodes) == 3
        for node in cluster.nodes:
            with redis.Redis(port=node.port) as client:
                info = client.cluster("INFO")
                assert info["cluster_state"] == "ok" and int(info["cluster_size"]) == 3
    finally:
        cluster.cleanup()
    assert not any(n.alive() for n in cluster.nodes) and not cluster.workdir.exists()

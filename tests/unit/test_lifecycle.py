"""Start-up checks: one-line errors that name the port or broker and what changes it."""

from __future__ import annotations

import socket

import pytest

from featureplane.errors import StartupError
from featureplane.lifecycle import check_kafka_reachable, check_port_free


def test_a_taken_port_names_itself_and_the_setting() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(StartupError) as err:
            check_port_free("127.0.0.1", port, "the HTTP API", "--port or FEATUREPLANE_PORT")
    text = str(err.value)
    assert f"port {port}" in text and "already in use" in text and "--port" in text
    assert "\n" not in text


def test_a_free_port_and_port_0_pass() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check_port_free("127.0.0.1", port, "x", "y")
    check_port_free("127.0.0.1", 0, "x", "y")


def test_an_unknown_host_is_a_start_up_error() -> None:
    with pytest.raises(StartupError, match=r"cannot listen on no-such-host\.invalid:8000"):
        check_port_free("no-such-host.invalid", 8000, "the HTTP API", "--host")


def test_kafka_check_accepts_any_live_server_and_names_every_dead_one() -> None:
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        host, port = live.getsockname()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        check_kafka_reachable(f"127.0.0.1:{dead},PLAINTEXT://{host}:{port}")
    with pytest.raises(StartupError) as err:
        check_kafka_reachable(f"127.0.0.1:{dead},[::1]:{dead},nonsense")
    text = str(err.value)
    assert f"127.0.0.1:{dead}: Connection refused" in text
    assert "'nonsense' is not HOST:PORT" in text and "FEATUREPLANE_KAFKA_BOOTSTRAP" in text

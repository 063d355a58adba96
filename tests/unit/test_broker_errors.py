"""A Kafka call that fails under `up` or `backfill` is one line naming the broker and the
reason, never a KafkaException traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from featureplane.cli import main, up
from featureplane.errors import StartupError
from featureplane.lifecycle import broker_error
from featureplane.operators import kafka
from featureplane.spec import load_catalog

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TRANSPORT = KafkaException(
    KafkaError(-195, "Failed to get metadata: Local: Broker transport failure")
)


@pytest.fixture
def listener() -> Iterator[str]:
    """An address that accepts TCP connections (the start-up check passes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_broker_error_gives_librdkafkas_reason_alone() -> None:
    err = broker_error("b:9092", "create the topics", TRANSPORT)
    assert isinstance(err, StartupError)
    assert str(err) == (
        "cannot create the topics on Kafka at b:9092: "
        "Failed to get metadata: Local: Broker transport failure"
    )
    assert str(broker_error("b:1", "x", TimeoutError())) == "cannot x on Kafka at b:1: timed out"


@pytest.mark.parametrize("failure", [TRANSPORT, TimeoutError()])
def test_up_topic_creation_failure_is_a_start_up_error(
    monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    def ensure_topics(*_: object) -> None:
        raise failure

    monkeypatch.setattr("featureplane.operators.kafka_cluster.ensure_topics", ensure_topics)
    with pytest.raises(StartupError, match=r"^cannot create the topics on Kafka at b:1: \S"):
        up.create_topics("b:1", load_catalog(EXAMPLES))


class _FailingConsumer:
    """A consumer whose broker fails every call, as librdkafka reports it."""

    closed = False

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def list_topics(self, *args: object, **kwargs: object) -> None:
        raise TRANSPORT

    def close(self) -> None:
        _FailingConsumer.closed = True
        raise RuntimeError("already closed")  # must not hide the real failure


def test_backfill_kafka_failure_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    listener: str,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(kafka, "Consumer", _FailingConsumer)  # what range_reader builds
    argv = ["backfill", "--topic", "user-actions", "--from", "0", "--to", "1"]
    argv += ["--spec", str(EXAMPLES), "--bootstrap", listener, "--data-dir", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == (
        f"featureplane: cannot read topic 'user-actions' on Kafka at {listener}: "
        "Failed to get metadata: Local: Broker transport failure\n"
    )
    assert _FailingConsumer.closed


def test_backfill_dead_broker_is_reported_before_any_kafka_call(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(kafka, "Consumer", None)  # never reached
    argv = ["backfill", "--topic", "user-actions", "--from", "0", "--to", "1"]
    argv += ["--spec", str(EXAMPLES), "--bootstrap", dead, "--data-dir", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"featureplane: cannot reach Kafka at {dead}") and err.count("\n") == 1

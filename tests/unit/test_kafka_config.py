"""FEATUREPLANE_KAFKA_CONFIG: parsed once, reserved properties refused, checked by
librdkafka, given to every client kind, and its values never shown; MSK IAM tokens
signed offline with stand-in AWS credentials (what MSK then checks is not verifiable
here)."""

from __future__ import annotations

import argparse
import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydantic
import pytest
from confluent_kafka import KafkaError, KafkaException

from featureplane.batch import backfill
from featureplane.cli import demo, main
from featureplane.cli.flags import add_flags
from featureplane.cli.parser import build_parser
from featureplane.kafka_config import MSK_IAM, RESERVED, KafkaConfig
from featureplane.operators import kafka, kafka_cluster
from featureplane.operators.kafka import Deliverer, GroupConsumer
from featureplane.operators.kafka_cluster import KafkaCluster
from featureplane.operators.metrics import IngestMetrics
from featureplane.operators.records import Message
from featureplane.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SECRET = "s3cret-4b9e"
SCRAM = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "featureplane",
    "sasl.password": SECRET,
}


def test_a_json_object_of_strings_numbers_and_booleans() -> None:
    text = json.dumps({**SCRAM, "socket.keepalive.enable": True, "linger.ms": 20})
    config = KafkaConfig.parse(text)
    assert dict(config) == {**SCRAM, "socket.keepalive.enable": True, "linger.ms": 20}
    assert KafkaConfig.parse(" ") == KafkaConfig() == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"sasl.password": "x"', "not valid JSON (Expecting ',' delimiter"),
        ('["security.protocol"]', "must be a JSON object of librdkafka properties"),
        ('"SSL"', "not a string"),
        ('{"ssl": {"ca": "x"}}', '"ssl" must be a string, number or true/false, not an object'),
        ('{"client.id": null}', '"client.id" must be a string, number or true/false, not null'),
        ('{"x.y": 1}', 'librdkafka refuses it: No such configuration property: "x.y"'),
        ('{"security.protocol": "TLS"}', 'Invalid value "TLS" for configuration property'),
        ('{"ssl.ca.location": "/no/ca.pem"}', '"ssl.ca.location": no file or folder at'),
        ('{"error_cb": "f", "on_delivery": "g"}', '"on_delivery" is a callback'),
        ('{"featureplane.iam": true}', '"featureplane.iam" is not a featureplane property'),
        (
            '{"featureplane.aws_msk_iam": true, "security.protocol": "SASL_SSL"}',
            '"featureplane.aws_msk_iam" needs "sasl.mechanism": "OAUTHBEARER"',
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_property(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^[^\n]+$") as caught:
        KafkaConfig.parse(text)
    assert message in str(caught.value)


IAM = {"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER", MSK_IAM: True}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """AWS credentials and region from variables alone (no files of this machine's)."""
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "ap-northeast-2")
    return monkeypatch


def test_msk_iam_signs_tokens_with_the_aws_credentials(aws: pytest.MonkeyPatch) -> None:
    conf = KafkaCluster("b-1.msk.example:9098", KafkaConfig(IAM)).client_config()
    assert MSK_IAM not in conf and conf["sasl.mechanism"] == "OAUTHBEARER"
    token, expiry_s = conf["oauth_cb"]("")
    url = urlsplit(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode())
    query = parse_qs(url.query)
    assert url.netloc == "kafka.ap-northeast-2.amazonaws.com"
    assert query["Action"] == ["kafka-cluster:Connect"] and query["X-Amz-Signature"]
    assert query["X-Amz-Credential"][0].startswith("AKIDEXAMPLE/")
    assert 800 < expiry_s - time.time() <= 900  # seconds since the epoch, as librdkafka wants
    assert SECRET not in token
    KafkaConfig({**IAM, MSK_IAM: "eu-west-1"}).librdkafka()["oauth_cb"]("")


def test_msk_iam_without_a_region_says_where_to_give_it(aws: pytest.MonkeyPatch) -> None:
    aws.delenv("AWS_REGION")
    with pytest.raises(ValueError, match='no AWS region; set AWS_REGION, or give it: "featur'):
        KafkaConfig(IAM)


def test_every_property_featureplane_sets_is_refused_with_the_reason() -> None:
    for name, why in RESERVED.items():
        with pytest.raises(ValueError) as caught:
            KafkaConfig({name: "x"})
        assert str(caught.value) == f'"{name}" cannot be set here: {why}'
    with pytest.raises(ValueError) as caught:
        KafkaConfig({"enable.auto.commit": True, "acks": 1, "client.id": "ok"})
    assert '"enable.auto.commit"' in str(caught.value) and '"acks"' in str(caught.value)


def test_values_are_never_shown() -> None:
    config = KafkaConfig(SCRAM)
    shown = [repr(config), config.describe(), repr(Settings(kafka_config=config))]
    shown.append(str(KafkaCluster("b:9096", config)))
    assert all(SECRET not in text and "sasl.password" in text for text in shown)
    assert config.describe() == (
        "security.protocol=SASL_SSL, sasl.mechanism=SCRAM-SHA-512, sasl.username, sasl.password"
    )


def test_settings_read_the_variable_and_hide_it_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATUREPLANE_KAFKA_CONFIG", json.dumps(SCRAM))
    assert dict(Settings().kafka_config) == SCRAM
    monkeypatch.setenv("FEATUREPLANE_KAFKA_CONFIG", json.dumps({**SCRAM, "group.id": "g"}))
    with pytest.raises(pydantic.ValidationError) as caught:
        Settings()  # as `python -m bytewax.run` builds them, with no CLI around
    assert '"group.id" cannot be set here' in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [
        json.dumps({**SCRAM, "enable.auto.commit": True}),
        json.dumps(SCRAM)[:-1],  # cut short: bad JSON
        json.dumps({**SCRAM, "sasl.mechanisms": ["SCRAM-SHA-512"]}),
    ],
)
def test_the_command_line_says_it_in_one_line_with_status_2(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEATUREPLANE_KAFKA_CONFIG", value)
    assert main(["demo-events", "--bootstrap", "127.0.0.1:1", "--count", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featureplane: bad setting: FEATUREPLANE_KAFKA_CONFIG: ")
    assert err.count("\n") == 1 and SECRET not in err


def test_never_a_flag_nor_in_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="secret"):
        add_flags(argparse.ArgumentParser(), Settings, ["kafka_config"])
    monkeypatch.setenv("FEATUREPLANE_KAFKA_CONFIG", json.dumps(SCRAM))
    for command in ("ingest", "retry", "backfill", "up", "demo-events"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert "--kafka-config" not in out and SECRET not in out


def test_the_users_properties_replace_tuning_never_the_bootstrap() -> None:
    cluster = KafkaCluster("b:9096", KafkaConfig({**SCRAM, "linger.ms": 50}))
    conf = cluster.client_config({"linger.ms": 5, "acks": "all"})
    assert conf["linger.ms"] == 50 and conf["acks"] == "all"
    assert conf["bootstrap.servers"] == "b:9096" and callable(conf["error_cb"])
    assert {k: conf[k] for k in SCRAM} == SCRAM
    assert KafkaCluster("b:1").client_config()["bootstrap.servers"] == "b:1"


class _Client:
    """Stands in for a confluent-kafka client and keeps the configuration it was given."""

    made: list[dict[str, Any]] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.made.append(config)

    def list_topics(self, *args: object, **kwargs: object) -> None:
        raise KafkaException(KafkaError(-195, "Local: Broker transport failure"))

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    made: list[dict[str, Any]] = []
    monkeypatch.setattr(_Client, "made", made)
    for module, name in [
        (kafka, "Consumer"),
        (kafka, "Producer"),
        (kafka_cluster, "AdminClient"),
        (backfill, "Consumer"),
        (demo, "Producer"),
    ]:
        monkeypatch.setattr(module, name, _Client)
    yield made


def _never(message: object, tracker: object) -> Message:
    raise AssertionError("nothing is read")


@pytest.fixture
def listener() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_every_client_kind_gets_the_properties(
    clients: list[dict[str, Any]],
    listener: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    config = KafkaConfig({"client.id": "mine", "ssl.endpoint.identification.algorithm": "none"})
    cluster = KafkaCluster(listener, config)
    GroupConsumer(cluster, "g", ["t"], _never, flow="ingest", metrics=IngestMetrics())
    Deliverer(cluster)
    with pytest.raises(KafkaException):
        kafka_cluster.topic_partitions(cluster)
    monkeypatch.setenv("FEATUREPLANE_KAFKA_CONFIG", json.dumps(dict(config)))
    settings = Settings(kafka_bootstrap=listener, spec=EXAMPLES, data_dir=tmp_path)
    demo.run(settings, rate=0, count=1)
    argv = ["backfill", "--topic", "user-actions", "--from", "0", "--to", "1"]
    argv += ["--spec", str(EXAMPLES), "--bootstrap", listener, "--data-dir", str(tmp_path)]
    assert main(argv) == 1  # the stand-in's broker fails; backfill built its consumer first
    assert len(clients) == 5  # consumer, producer, admin, demo producer, backfill consumer
    for made in clients:
        assert made["bootstrap.servers"] == listener
        assert {k: made[k] for k in config} == dict(config)

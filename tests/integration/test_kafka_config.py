"""FEATUREPLANE_KAFKA_CONFIG reaches the Kafka clients of a real dataflow.

Against the real tansu broker: with harmless properties (a client.id, TCP
keep-alive, librdkafka's debug log, a password that PLAINTEXT never sends) an
event is ingested and a malformed one dead-lettered, the consumer's and the
producers' log lines carry the client.id, and no line shows the password.
With `security.protocol: SSL` against a plaintext listener, or a SCRAM login
the broker refuses, ingest stops with one line saying why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from featureplane.cli.broker import find_binary, free_port, start_process
from tests.integration.ingest_env import REPO, Env, click, now_ms, wait_for
from tests.services import Service

SECRET = "never-in-a-log-7c1f"


@pytest.fixture
def env(tmp_path: Path, kafka_bootstrap: str) -> Iterator[Env]:
    e = Env(tmp_path, kafka_bootstrap)
    yield e
    e.cleanup()


def test_ingest_with_client_properties_end_to_end(env: Env) -> None:
    client_id = f"fp-{env.tok}"
    config = {
        "client.id": client_id,
        "socket.keepalive.enable": True,
        "debug": "generic",  # each client logs its start, named after its client.id
        "sasl.password": SECRET,  # sent only over SASL: harmless here, and must stay unseen
    }
    user = f"kc-{env.tok}"
    env.produce("user-actions", [click(1, now_ms() - 1000, user=user), b"{not json"])
    proc = env.start(FEATUREPLANE_KAFKA_CONFIG=json.dumps(config))
    try:
        wait_for(env.all_committed, 60, env, "both records committed")
        dlq = env.read_topic(env.topic("user-actions") + ".dlq", 1)
        assert [m.value() for m in dlq] == [b"{not json"]
        assert env.rows("recent_user_clicked_fleaMarketArticles") == 1
    finally:
        assert env.stop(proc) == 0
    log = "".join(p.read_text(errors="replace") for p in env.dir.glob("ingest-*.log"))
    assert f"{client_id}#consumer-" in log, log[-2000:]  # the group consumer
    assert f"{client_id}#producer-" in log, log[-2000:]  # the admin client and the producer
    assert "(FEATUREPLANE_KAFKA_CONFIG: client.id, socket.keepalive.enable" in log
    assert SECRET not in log


@pytest.fixture(scope="module")
def scram_broker() -> Iterator[Service]:
    """A tansu that requires SASL/SCRAM logins. tansu 0.6 can add a user only through a
    broker that does not require one, and its in-memory store is per process: every
    login here is refused, which is what the test needs."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [find_binary("tansu"), "broker", "--listener-url", url]
    argv += ["--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
    svc = start_process("tansu-scram", [*argv, "--authentication"], port, None, 30)
    yield svc
    svc.cleanup()


def _ingest(env: Env, bootstrap: str, config: Mapping[str, object]) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-m", "featureplane.cli", "ingest"],
        env={
            **env.env,
            "FEATUREPLANE_KAFKA_BOOTSTRAP": bootstrap,
            "FEATUREPLANE_KAFKA_CONFIG": json.dumps(config),
        },
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return out.returncode, out.stderr


def test_tls_against_a_plaintext_listener_stops_ingest_in_one_line(env: Env) -> None:
    code, err = _ingest(env, env.bootstrap, {"security.protocol": "SSL"})
    last = err.strip().splitlines()[-1]
    assert code == 1, err[-2000:]
    assert last.startswith(f"featureplane: cannot reach Kafka at {env.bootstrap}"), last
    assert "security.protocol=SSL" in last and "Traceback" not in err


def test_a_refused_scram_login_stops_ingest_with_the_reason(
    env: Env, scram_broker: Service
) -> None:
    config = {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "featureplane",
        "sasl.password": SECRET,
    }
    code, err = _ingest(env, scram_broker.address, config)
    last = err.strip().splitlines()[-1]
    assert code == 1, err[-2000:]
    assert "SASL authentication error" in last, last
    assert "sasl.mechanism=SCRAM-SHA-512" in last and "Traceback" not in err
    assert SECRET not in err

"""FEATUREPLANE_KAFKA_CONFIG reaches the Kafka clients of a real dataflow.

Against the real tansu broker: with harmless properties (a client.id, TCP
keep-alive, librdkafka's debug log, a password that PLAINTEXT never sends) an
event is ingested and a malformed one dead-lettered, the consumer's and the
producers' log lines carry the client.id, and no line shows the password.
Over TLS (tansu behind a TLS listener with a certificate of the test's own
CA, as MSK's port 9094) the same works with `security.protocol: SSL`, the
certificate and host name verified. With `security.protocol: SSL` against a
plaintext listener, or a SCRAM login the broker refuses, ingest stops with
one line saying why.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from featureplane.cli.broker import find_binary, free_port, start_process
from tests.integration.ingest_env import PARTITIONS, REPO, Env, click, now_ms, wait_for
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


# ---------------------------------------------------------------- TLS


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "featureplane test broker")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "broker.pem", folder / "broker.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _TlsFront:
    """A TLS listener that passes each connection on to a plaintext broker."""

    def __init__(self, port: int, upstream: int, context: ssl.SSLContext) -> None:
        self.loop = asyncio.new_event_loop()
        self.port, self.upstream, self.context = port, upstream, context
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.context)
        )
        ready.set()
        self.loop.run_forever()
        server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """tansu advertising a TLS front as its address; its bootstrap and the CA file."""
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    inner, front = free_port(), free_port()
    argv = [find_binary("tansu"), "broker", "--listener-url", f"tcp://127.0.0.1:{inner}"]
    argv += ["--advertised-listener-url", f"tcp://127.0.0.1:{front}"]
    svc = start_process(
        "tansu-tls", [*argv, "--storage-engine", "memory://tansu/"], inner, None, 30
    )
    tls = _TlsFront(front, inner, context)
    yield f"127.0.0.1:{front}", cert
    tls.close()
    svc.cleanup()


def test_ingest_over_tls_with_the_brokers_ca(env: Env, tls_broker: tuple[str, Path]) -> None:
    bootstrap, ca = tls_broker
    config = {"security.protocol": "SSL", "ssl.ca.location": str(ca)}
    client = {"bootstrap.servers": bootstrap, **config}
    topic = env.topic("user-actions")
    producer = Producer(client)
    for value in (click(1, now_ms() - 1000, user=f"tls-{env.tok}"), b"{not json"):
        producer.produce(topic, value, b"k", partition=0)
    assert producer.flush(30) == 0
    proc = env.start(
        FEATUREPLANE_KAFKA_BOOTSTRAP=bootstrap, FEATUREPLANE_KAFKA_CONFIG=json.dumps(config)
    )
    try:
        wait_for(
            lambda: env.rows("recent_user_clicked_fleaMarketArticles") == 1, 60, env, "the click"
        )
        assert _read(client, topic + ".dlq", 1) == [b"{not json"]  # via the TLS producer
    finally:
        assert env.stop(proc) == 0


def _read(client: Mapping[str, Any], topic: str, n: int) -> list[bytes | None]:
    c = Consumer({**client, "group.id": f"reader-{uuid.uuid4()}"})
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    out: list[bytes | None] = []
    for _ in range(40):
        out += [m.value() for m in c.consume(100, 0.5) if m.error() is None]
        if len(out) >= n:
            break
    c.close()
    return out

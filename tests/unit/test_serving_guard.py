"""Serving's defences alone: bounded error bodies whatever the input, the rate-limited
log, the fd-limit fit of the connection cap, and /readyz states over a fake store."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from featureplane.errors import StoreError
from featureplane.serving.api import ApiError, parse_body, parse_query
from featureplane.serving.app import create_app, drain
from featureplane.serving.config import ServeConfig
from featureplane.serving.connections import fit_to_fd_limit
from featureplane.serving.logs import RateLimitedLog
from featureplane.spec import Catalog, FeatureGroup
from tests.unit.test_serving_reader import FakeStore

GROUP = FeatureGroup.model_validate(
    {
        "name": "ts",
        "entity": "u",
        "kind": "timeseries",
        "max_items": 5,
        "features": [{"name": "x", "type": "int"}],
    }
)
CATALOG = Catalog(groups={"ts": GROUP})


def _nested(depth: int, leaf: bytes = b"1") -> bytes:
    return b"[" * depth + leaf + b"]" * depth


@pytest.mark.parametrize(
    "value",
    [
        _nested(900),
        _nested(1_000),
        _nested(20_000),
        b'{"a":' * 1_000 + b"1" + b"}" * 1_000,
        b"9" * 5_000,
        b'"' + b"x" * 2_000_000 + b'"',
        b"NaN",
        b'"\\ud800"',
        b'"\xff"',
        b"[" + b",".join([b'"' + b"y" * 100 + b'"'] * 10_000) + b"]",
    ],
)
@pytest.mark.parametrize("field", ["group", "ids", "limit", "since", "features", "extra"])
def test_any_value_in_any_field_is_a_small_400(field: str, value: bytes) -> None:
    fields = {"group": b'"ts"', "ids": b'["u1"]', field: value}
    body = (
        b'{"requests": [{'
        + b",".join(b'"%s": %s' % (k.encode(), v) for k, v in fields.items())
        + b"}]}"
    )
    with pytest.raises(ApiError) as err:
        parse_body(CATALOG, body)
    assert err.value.status == 400
    assert len(err.value.body()) <= 4096


def test_query_values_are_quoted_short() -> None:
    for text in ("[" * 10_000, "9" * 5_000, "\udcff" * 100, "x" * 1_000_000):
        with pytest.raises(ApiError) as err:
            parse_query(CATALOG, "ts", "u1", {"limit": text})
        assert err.value.code == "bad_limit" and len(err.value.body()) <= 4096
    with pytest.raises(ApiError) as err:
        parse_query(CATALOG, "g" * 1_000_000, "u1", {})
    assert err.value.code == "unknown_group" and len(err.value.body()) <= 200


def test_api_error_body_is_bounded_and_encodable_whatever_the_message() -> None:
    for message in ("\x00" * 100_000, "\ud800" * 5_000, "é" * 100_000):
        body = ApiError(400, "bad_request", message).body()
        assert len(body) <= 4096


def test_rate_limited_log_one_line_a_kind_an_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    events = RateLimitedLog(logging.getLogger("t"), interval=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        logged = [events.event("refused", "refused") for _ in range(10_000)]
        assert logged.count(True) == 1 and events.event("other", "other")
        now[0] = 60.0
        assert events.event("refused", "refused")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused (1 such event since the last line of this kind)",
        "other (1 such event since the last line of this kind)",
        "refused (10000 such events since the last line of this kind)",
    ]


def test_connection_cap_fits_the_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert fit_to_fd_limit(10) == 10
    top = hard if hard != resource.RLIM_INFINITY else soft
    cap = fit_to_fd_limit(10**9, reserve=256)
    assert 1 <= cap <= max(top - 256, 1)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= soft  # raised, never lowered


class PingStore(FakeStore):
    async def ping(self) -> None:
        if self.down:
            raise StoreError("store is down")


async def test_readyz_states() -> None:
    store = PingStore(CATALOG)
    app = create_app(CATALOG, store=store)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/readyz")
        assert resp.status == 200
        assert await resp.json() == {"ready": True, "status": "ok", "tiers": {"store": "up"}}
        store.down = True
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert await resp.json() == {
            "ready": False,
            "status": "unavailable",
            "tiers": {"store": "down"},
        }
        store.down = False
        drain(app)
        resp = await client.get("/readyz")
        assert resp.status == 503 and (await resp.json())["status"] == "draining"
        assert (await client.get("/healthz")).status == 200  # alive while draining


def test_k8s_probes_match_the_endpoints_and_the_drain() -> None:
    path = Path(__file__).resolve().parents[2] / "k8s" / "serve.yaml"
    deploy = next(d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    [serve] = pod["containers"]
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
    config = ServeConfig()
    assert (
        serve["livenessProbe"]["periodSeconds"] * serve["livenessProbe"]["failureThreshold"]
        > config.header_timeout
    )
    assert pod["terminationGracePeriodSeconds"] > config.drain_delay + config.shutdown_timeout


def test_rate_limited_log_keeps_the_traceback_of_a_bug(caplog: pytest.LogCaptureFixture) -> None:
    events = RateLimitedLog(logging.getLogger("t"), interval=60.0, clock=lambda: 0.0)
    bug = RuntimeError("boom")
    with caplog.at_level(logging.WARNING):
        for _ in range(1_000):
            events.event("bug /v1/features", "unhandled error", bug)
    [record] = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None

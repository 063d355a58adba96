"""The dashboard and the alerts read only what the processes really export.

A real `serve` (embedded store, redis-server), a real `ingest` and a real `retry`
dataflow (the tansu broker) run on one spec; a few events go through them (one
malformed, so the DLQ counts it; ingest's Redis is down, so the rest also go
through the retry topic, which the retry dataflow writes to the live Redis);
serving answers hits, a 400, a failing on-demand function and, once its Redis
is killed, tier errors. Then each /metrics page is scraped and every PromQL
expression of k8s/alerts.yaml and of k8s/dashboards/featureplane.json must
parse and select only exported metrics and labels (tests/promql_check.py).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from featureplane.operators.metrics import IngestMetrics
from tests.integration.ingest_env import Env, click, now_ms, wait_for
from tests.promql_check import (
    Known,
    dashboard_expressions,
    exported,
    problems,
    rule_expressions,
)
from tests.services import REPO, Service, free_port, start_redis

RULES = REPO / "k8s" / "alerts.yaml"
BOARD = REPO / "k8s" / "dashboards" / "featureplane.json"
RUNBOOK = "https://github.com/featureplane/featureplane#runbook-"

BOOM_GROUP = """
feature_groups:
  - name: boom_context
    entity: user
    kind: latest
    on_demand: fp_boom:boom
    features:
      - {name: n, type: int}
"""


def _get(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _scrape(port: int) -> str:
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return body.decode()


def _value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


# ---------------------------------------------------------------- without services


def test_every_alert_says_how_bad_where_and_what_to_do() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert doc["kind"] == "PrometheusRule" and doc["metadata"]["namespace"] == "featureplane"
    assert "release" in doc["metadata"]["labels"]  # what kube-prometheus-stack selects on
    alerts = [r for g in doc["spec"]["groups"] for r in g["rules"]]
    assert len(alerts) >= 8
    for rule in alerts:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        assert notes["runbook_url"] == RUNBOOK + name.lower(), name


def test_the_dashboard_is_stable_and_picks_its_data_source() -> None:
    board = json.loads(BOARD.read_text())
    assert board["uid"] == "featureplane" and board["title"] == "featureplane"
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Serving", "Ingestion", "Retry", "Batch"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_a_flow_counts_its_failures_at_zero_before_any_record() -> None:
    m = IngestMetrics()
    m.initialize("ingest", ["user-actions"], ["user-actions"])
    dlq = {"flow": "ingest", "topic": "user-actions"}
    assert m.value("featureplane_ingest_dlq_total", dlq) == 0
    assert m.value("featureplane_ingest_failures_total", {"flow": "ingest", "reason": "cache"}) == 0
    assert (
        m.value("featureplane_ingest_internal_errors_total", {"flow": "ingest", "step": "write"})
        == 0
    )


# ---------------------------------------------------------------- the three processes


@pytest.fixture
def env(tmp_path: Path, kafka_bootstrap: str) -> Iterator[Env]:
    (tmp_path / "env").mkdir()
    e = Env(tmp_path / "env", kafka_bootstrap)
    yield e
    e.cleanup()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Service]:
    svc = start_redis(workdir=tmp_path / "redis")
    yield svc
    svc.cleanup()


def test_dashboard_and_alerts_use_only_exported_metrics_and_labels(
    env: Env, own_redis: Service, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "fp_boom.py").write_text("def boom(user_id):\n    raise RuntimeError('boom')\n")
    (env.dir / "spec" / "boom.yaml").write_text(BOOM_GROUP)
    env.env["PYTHONPATH"] = str(code)
    live = f"redis://{own_redis.address}/0"
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: every cache write fails
    ports = {"ingest": free_port(), "retry": free_port(), "serve": free_port()}
    env.start(
        "ingest",
        FEATUREPLANE_METRICS_PORT=str(ports["ingest"]),
        FEATUREPLANE_REDIS_URL=dead,
        FEATUREPLANE_WRITE_TIMEOUT="1s",
    )
    env.start(
        "retry",
        FEATUREPLANE_METRICS_PORT=str(ports["retry"]),
        FEATUREPLANE_REDIS_URL=live,
        FEATUREPLANE_BACKOFF_BASE="100ms",
        FEATUREPLANE_BACKOFF_CAP="500ms",
    )
    env.start(
        "serve",
        FEATUREPLANE_PORT=str(ports["serve"]),
        FEATUREPLANE_REDIS_URL=live,
        FEATUREPLANE_SERVE_DRAIN_DELAY="0",
        FEATUREPLANE_SERVE_WORKERS="1",  # the second read must meet the first's local tier
    )
    t = now_ms() - 1_000
    user = f"x-{env.tok}"
    env.produce("user-actions", [click(i, t + i, user=user) for i in range(6)] + [b'{"oops'])

    def scraped(kind: str) -> str:
        try:
            return _scrape(ports[kind])
        except OSError:
            return ""

    def through() -> bool:
        ingest, retry = scraped("ingest"), scraped("retry")
        return (
            _value(ingest, "featureplane_ingest_dlq_total", flow="ingest") == 1
            and _value(ingest, "featureplane_ingest_retry_total", flow="ingest") >= 1
            and _value(ingest, "featureplane_ingest_lag", flow="ingest") == 0
            and _value(retry, "featureplane_ingest_items_written_total", tier="redis") >= 1
            and 'featureplane_ingest_lag{flow="ingest"' in ingest
            and 'featureplane_ingest_committed_offset{flow="ingest"' in ingest
            and 'featureplane_ingest_lag{flow="retry"' in retry
        )

    wait_for(through, 60, env, "the events through ingest, the DLQ and retry")

    base = f"http://127.0.0.1:{ports['serve']}"
    wait_for(lambda: scraped("serve") != "", 30, env, "serve listening")
    recent = f"{base}/v1/features/recent_user_clicked_fleaMarketArticles/{user}"
    for _ in range(2):  # the store, then the local tier
        status, body = _get(recent)
        assert status == 200 and json.loads(body)["found"], body
    many = {"requests": [{"group": "user_last_click", "ids": [user, "nobody"]}]}
    assert _get(f"{base}/v1/features", json.dumps(many).encode())[0] == 200
    assert _get(f"{base}/v1/features/no_such_group/u1")[0] == 400
    assert _get(f"{base}/v1/features/boom_context/u1")[0] == 503
    own_redis.kill()  # serving's Redis goes away: reads of new ids count tier errors
    for i in range(3):
        _get(f"{base}/v1/features/user_last_click/gone-{i}")
    serve = scraped("serve")
    assert _value(serve, "featureplane_tier_errors_total", tier="redis") >= 1

    pages = {kind: scraped(kind) for kind in ports}
    known: Known = {}
    for text in pages.values():
        for name, labels in exported(text).items():
            known[name] = known.get(name, frozenset()) | labels
    assert problems("featureplane_not_a_metric", known)  # the check can fail

    expressions = [*rule_expressions(RULES), *dashboard_expressions(BOARD)]
    assert len(expressions) > 40
    found = [
        f"{where}: {p}\n    {expr}" for where, expr in expressions for p in problems(expr, known)
    ]
    assert not found, "\n".join(found)

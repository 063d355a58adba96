"""Checks the PromQL of the alerts and the dashboard against the metrics the processes export.

`exported(text)` reads a /metrics page into {sample name: its label names}, the
names exactly as scraped (`..._total` of counters, `_bucket`/`_count`/`_sum` of
histograms, `le` on buckets). `problems(expr, known)` parses one expression
and returns what is wrong with it, empty when nothing is:

- it does not parse;
- a selected metric is in no process's /metrics (nor in `EXTERNAL`);
- a label in a selector's matchers is not on that metric;
- a label in `by`/`without` is not on the expression aggregated, one in
  `on`/`ignoring` is missing from a side, one in `group_left`/`group_right`
  is not on the "one" side.

Besides what the scraped processes export, the known series are `EXTERNAL`
(Prometheus' own, kube-state-metrics) and `pushed()`: what batch runs and shard
pods push to the Pushgateway, and what the Argo workflows that `batch render`
writes emit through the Argo controller, each taken from the code that makes it.

The labels Prometheus adds at scrape time (`SCRAPE_LABELS`) are on every
series. Grafana variables are substituted first (`substitute`): the interval
variables become a duration (`5m`), any other `$var`/`${var}` becomes `x`, so
they may stand only where a label value or a duration does.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import promql_parser as pq
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "EXTERNAL",
    "SCRAPE_LABELS",
    "Known",
    "dashboard_expressions",
    "exported",
    "problems",
    "pushed",
    "rule_expressions",
    "substitute",
]

Known = dict[str, frozenset[str]]

SCRAPE_LABELS = frozenset({"namespace", "pod", "job", "instance", "container", "endpoint"})
"""Labels a Prometheus Operator scrape puts on every series of a pod's target
(a PodMonitor: `job` is `<namespace>/<PodMonitor name>`, `endpoint` the port name)."""

EXTERNAL: Known = {
    # Written by Prometheus itself for every target.
    "up": frozenset(),
    # kube-state-metrics (part of kube-prometheus-stack): the Kubernetes Jobs and CronJobs,
    # and the pods of batch runs (their phase and owner: a Workflow or a Job).
    "kube_job_status_active": frozenset({"job_name"}),
    "kube_job_status_succeeded": frozenset({"job_name"}),
    "kube_job_status_failed": frozenset({"job_name", "reason"}),
    "kube_job_owner": frozenset({"job_name", "owner_kind", "owner_name", "owner_is_controller"}),
    "kube_cronjob_status_last_successful_time": frozenset({"cronjob"}),
    "kube_cronjob_status_active": frozenset({"cronjob"}),
    "kube_pod_status_phase": frozenset({"phase"}),
    "kube_pod_owner": frozenset({"owner_kind", "owner_name", "owner_is_controller", "uid"}),
}
"""Series that no featureplane process exports but the dashboard or alerts may use."""


@functools.cache
def pushed() -> Known:
    """The series no process serves for scraping: a batch run's gauges (written to a file
    and pushed), a shard pod's and an engine's job steps' (`batch plan --shard-list` and
    `batch report`, pushed, here to a local stand-in that keeps the bodies), and the Argo
    controller's metrics of the workflows rendered from k8s/spec/."""
    from featureplane.batch.metrics import JobMetrics, push_shard, push_started, registry_of, report
    from featureplane.batch.render import render_argo
    from featureplane.batch.shards import ShardResult
    from featureplane.settings import Settings
    from featureplane.spec import load_catalog

    run = JobMetrics("j", "running", 1.0, 1.0, 1, 0, 0, 0, 1.0, 1.0, 1.0)
    known = dict(exported(generate_latest(registry_of([run])).decode()))
    bodies: list[bytes] = []

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        do_POST = do_PUT

        def do_GET(self) -> None:  # the report reads the shards' gauges: none here
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    spec = Path(__file__).resolve().parents[1] / "k8s" / "spec"
    catalog = load_catalog(spec)
    job = next(j for j in catalog.jobs.values() if j.schedule)
    with HTTPServer(("127.0.0.1", 0), Gateway) as gateway:
        threading.Thread(target=gateway.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{gateway.server_address[1]}"
        settings = Settings(_env_file=None, pushgateway_url=url, batch_job="j")
        push_shard(settings, (0, 1), ShardResult(1, 0, 1))
        push_started(settings, job, 0, 1)
        report(settings, job, 0, "succeeded")
        gateway.shutdown()
    assert len(bodies) == 3, bodies
    for body in bodies:
        known |= exported(body.decode())
    spec = Path(__file__).resolve().parents[1] / "k8s" / "spec"
    for doc in render_argo(catalog, "featureplane", "featureplane"):
        if doc["kind"] not in ("CronWorkflow", "WorkflowTemplate"):
            continue
        wf = doc["spec"].get("workflowSpec", doc["spec"])
        for where in [wf, *wf["templates"]]:
            for m in where.get("metrics", {}).get("prometheus", []):
                # Argo prefixes the name and adds no suffix (counters keep theirs)
                labels = frozenset(label["key"] for label in m.get("labels", []))
                known[f"argo_workflows_{m['name']}"] = labels
    return known


_DURATION_VARS = ("__rate_interval", "__interval", "__range", "interval")
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr: str) -> str:
    """`expr` with Grafana's variables replaced: intervals by `5m`, the others by `x`."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return "5m" if name in _DURATION_VARS else "x"

    return _VAR.sub(repl, expr)


def exported(text: str) -> Known:
    """{sample name: label names} of one /metrics page."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in out.items()}


# -- where the expressions are


def rule_expressions(path: Path) -> Iterator[tuple[str, str]]:
    """(where, expr) of every rule of a PrometheusRule file."""
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule.get("record")
                yield f"{path.name}: {name}", str(rule["expr"])


_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),)?\s*(\w+)\s*\)\s*$", re.DOTALL)


def dashboard_expressions(path: Path) -> Iterator[tuple[str, str]]:
    """(where, expr) of every panel target and every query variable of a dashboard.

    A `label_values(selector, label)` variable is checked as `selector` grouped
    `by (label)`, so both the metric and the label must be exported.
    """
    board = json.loads(path.read_text())
    for panel in _panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"{path.name}: panel {panel.get('title')!r}", str(target["expr"])
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        m = _LABEL_VALUES.match(text)
        where = f"{path.name}: variable {var.get('name')!r}"
        if m and m.group(1):
            yield where, f"count by ({m.group(2)}) ({m.group(1)})"
        else:
            yield where, text


def _panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # the panels of a collapsed row


# -- the check


def problems(expr: str, known: Known) -> list[str]:
    """What is wrong with `expr` (after `substitute`), given the exported series."""
    try:
        ast = pq.parse(substitute(expr))
    except Exception as exc:  # the parser raises its own plain errors
        return [f"does not parse: {exc}"]
    found: list[str] = []
    _labels(ast, known, found)
    return found


def _series_labels(name: str | None, known: Known) -> frozenset[str] | None:
    if name is None:
        return None
    if name in known:
        return known[name] | SCRAPE_LABELS | {"__name__"}
    if name in EXTERNAL:
        return EXTERNAL[name] | SCRAPE_LABELS | {"__name__"}
    if name.startswith(("featureplane_batch_", "argo_workflows_")) and name in pushed():
        return pushed()[name] | SCRAPE_LABELS | {"__name__"}
    return None


def _labels(e: Any, known: Known, found: list[str]) -> frozenset[str]:
    """The label names the series of `e` may carry, noting every problem in `found`."""
    if isinstance(e, pq.MatrixSelector):
        return _labels(e.vector_selector, known, found)
    if isinstance(e, pq.VectorSelector):
        return _selector(e, known, found)
    if isinstance(e, (pq.ParenExpr, pq.UnaryExpr, pq.SubqueryExpr)):
        return _labels(e.expr, known, found)
    if isinstance(e, pq.Call):
        return _call(e, known, found)
    if isinstance(e, pq.AggregateExpr):
        inner = _labels(e.expr, known, found)
        mod = e.modifier
        if mod is None:
            return frozenset()
        names, by = frozenset(mod.labels), mod.type == pq.AggModifierType.By
        if missing := names - inner:
            word = "by" if by else "without"
            found.append(f"{e.op} {word} {sorted(missing)}: not on {e.expr}")
        return names if by else inner - names
    if isinstance(e, pq.BinaryExpr):
        return _binary(e, known, found)
    return frozenset()  # numbers and strings


def _selector(e: Any, known: Known, found: list[str]) -> frozenset[str]:
    name = e.name
    matchers = list(e.matchers.matchers) + [m for ms in e.matchers.or_matchers for m in ms]
    if name is None:  # {__name__="..."}
        name = next((m.value for m in matchers if m.name == "__name__"), None)
    labels = _series_labels(name, known)
    if labels is None:
        found.append(f"metric {name} is exported by no process")
        return SCRAPE_LABELS
    for m in matchers:
        if m.name not in labels:
            found.append(f"label {m.name!r} is not on {name} (it has {sorted(labels)})")
    return labels


def _call(e: Any, known: Known, found: list[str]) -> frozenset[str]:
    args = [a for a in e.args if not isinstance(a, (pq.StringLiteral, pq.NumberLiteral))]
    labels: frozenset[str] = frozenset()
    for a in args:
        labels |= _labels(a, known, found)
    func = e.func.name
    if func == "histogram_quantile":
        if "le" not in labels:
            found.append(f"histogram_quantile over series without le: {e}")
        return labels - {"le"}
    if func in ("label_replace", "label_join"):
        return labels | {e.args[1].val if hasattr(e.args[1], "val") else str(e.args[1])}
    if func in ("absent", "absent_over_time"):
        return frozenset()
    return labels


def _binary(e: Any, known: Known, found: list[str]) -> frozenset[str]:
    lhs, rhs = _labels(e.lhs, known, found), _labels(e.rhs, known, found)
    mod = e.modifier
    if not lhs or not rhs or mod is None:  # a scalar side, or no matching clause
        return lhs | rhs if str(e.op).lower() == "or" else lhs or rhs
    if mod.matching is not None:
        names = frozenset(mod.matching.labels)
        sides = (lhs, rhs) if mod.matching.type == pq.LabelModifierType.Include else ()
        for side, expr in zip(sides, (e.lhs, e.rhs), strict=False):
            if missing := names - side:
                found.append(f"on {sorted(missing)}: not on {expr}")
    card = mod.card
    extra = frozenset(mod.group_labels or ())
    if card == pq.VectorMatchCardinality.ManyToOne:
        if missing := extra - rhs:
            found.append(f"group_left {sorted(missing)}: not on {e.rhs}")
        return lhs | extra
    if card == pq.VectorMatchCardinality.OneToMany:
        if missing := extra - lhs:
            found.append(f"group_right {sorted(missing)}: not on {e.lhs}")
        return rhs | extra
    return lhs | rhs if str(e.op).lower() == "or" else lhs

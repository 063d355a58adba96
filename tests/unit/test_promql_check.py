"""The PromQL checker of the dashboard and the alerts fails on what it must fail on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tests.promql_check import (
    Known,
    dashboard_expressions,
    exported,
    problems,
    rule_expressions,
    substitute,
)


@pytest.fixture(scope="module")
def known() -> Known:
    r = CollectorRegistry()
    Counter("fp_events", "", ["flow", "topic"], registry=r).labels("ingest", "t").inc()
    Gauge("fp_lag", "", ["flow", "topic", "partition"], registry=r).labels("ingest", "t", "0")
    Histogram("fp_fresh_seconds", "", ["group"], registry=r).labels("g").observe(0.1)
    Counter("fp_never", "", ["x"], registry=r)  # declared, never incremented: no samples
    return exported(generate_latest(r).decode())


def test_exported_names_are_the_scraped_sample_names(known: Known) -> None:
    assert known["fp_events_total"] == {"flow", "topic"}
    assert known["fp_fresh_seconds_bucket"] == {"group", "le"}
    assert known["fp_fresh_seconds_count"] == {"group"}
    assert "fp_events" not in known and "fp_never_total" not in known


@pytest.mark.parametrize(
    "expr",
    [
        'sum by (topic) (rate(fp_events_total{flow="ingest"}[$__rate_interval]))',
        "histogram_quantile(0.99, sum by (group, le) (rate(fp_fresh_seconds_bucket[5m]))) > 5",
        "min_over_time(fp_lag[15m]) > 0 unless on (pod, topic, partition) changes(fp_lag[15m]) > 0",
        'sum(rate(fp_events_total{namespace="$namespace", pod=~"${pod:regex}"}[5m]))',
        "fp_lag * on (topic) group_left (flow) sum by (topic, flow) (fp_events_total)",
        'up{job=~".+/featureplane"} == 0',
    ],
)
def test_good_expressions_pass(expr: str, known: Known) -> None:
    assert problems(expr, known) == []


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("sum by (topic) (rate(fp_events_total[5m])", "does not parse"),
        ("rate(fp_events_total[$__rate_interval]) +", "does not parse"),
        ("rate(fp_events[5m])", "metric fp_events is exported by no process"),
        ("rate(fp_never_total[5m])", "metric fp_never_total is exported by no process"),
        ("fp_fresh_seconds_p99", "exported by no process"),
        ('rate(fp_events_total{partition="0"}[5m])', "label 'partition' is not on fp_events_total"),
        ("sum by (group) (rate(fp_events_total[5m]))", "by ['group']"),
        ("sum by (topic) (sum by (flow) (fp_events_total))", "by ['topic']"),
        ("histogram_quantile(0.5, sum by (group) (rate(fp_fresh_seconds_bucket[5m])))", "le"),
        ("fp_lag / on (group) fp_events_total", "on ['group']"),
        ("fp_lag * on (topic) group_left (group) fp_events_total", "group_left ['group']"),
    ],
)
def test_bad_expressions_fail(expr: str, says: str, known: Known) -> None:
    found = problems(expr, known)
    assert found and any(says in p for p in found), found


def test_substitute_grafana_variables() -> None:
    got = substitute('rate(x{a="$namespace", b=~"${group:regex}", c="[[old]]"}[$__rate_interval])')
    assert got == 'rate(x{a="x", b=~"x", c="x"}[5m])'


def test_expressions_are_found_in_rules_and_dashboards(tmp_path: Path) -> None:
    rules = tmp_path / "alerts.yaml"
    rules.write_text(
        "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nspec:\n  groups:\n"
        "    - name: g\n      rules:\n        - alert: A\n          expr: fp_lag > 0\n"
    )
    assert list(rule_expressions(rules)) == [("alerts.yaml: A", "fp_lag > 0")]
    board = tmp_path / "board.json"
    board.write_text(
        json.dumps(
            {
                "panels": [
                    {
                        "type": "row",
                        "title": "r",
                        "panels": [{"title": "p", "targets": [{"expr": "fp_lag"}]}],
                    },
                ],
                "templating": {
                    "list": [
                        {"type": "datasource", "name": "datasource", "query": "prometheus"},
                        {
                            "type": "query",
                            "name": "g",
                            "query": {"query": 'label_values(fp_lag{flow="ingest"}, group)'},
                        },
                    ]
                },
            }
        )
    )
    found = list(dashboard_expressions(board))
    assert found == [
        ("board.json: panel 'p'", "fp_lag"),
        ("board.json: variable 'g'", 'count by (group) (fp_lag{flow="ingest"})'),
    ]
    # the variable's label is checked like any other
    assert problems(found[1][1], {"fp_lag": frozenset({"flow"})}) != []

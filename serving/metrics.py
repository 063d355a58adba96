"""Prometheus metrics of the server: plain numbers on the hot path, text at scrape time.

A request pays a dict lookup and a float addition per count (`Metrics.event`,
`Metrics.observe`: ~0.1-0.3 µs), not prometheus_client's locked values (~2-3 µs each,
measured with timeit). The families keep prometheus_client's call shapes that the rest of
the server uses (`.labels(...).inc()`, `.inc()`, `.set()`, `.set_function()`) and are
rendered through prometheus_client's metric families, so the exposition text (names,
labels, help) is what it was, less the `_created` samples nothing reads.

With `serve --workers N` each worker process has its own `Metrics`. `share(directory,
name)` makes it write a snapshot of its numbers to `<directory>/<name>.json` (once a
second, from `featureplane.serving.main`, and at each scrape), and `render` then answers
the whole server: counters and histograms summed over every worker's snapshot, including
workers that died (`retire`), so a sum never goes down when one is restarted; gauges over
the live workers only: connections summed, breaker states the worst (max) of any worker.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

__all__ = ["CONTENT_TYPE", "Family", "Histogram", "Metrics", "retire"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0)
_DEAD = ".dead.json"
Labels = tuple[str, ...]
# A snapshot: {"c"|"g": {name: [[labels, value], ...]}, "h": {name: [[labels, counts, sum]]}}
Snapshot = dict[str, dict[str, list[list[Any]]]]


class _Value:
    """One labelled number; the hot path adds to `value` directly."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, n: float = 1) -> None:
        self.value += n

    def set(self, v: float) -> None:
        self.value = v

    def get(self) -> float:
        return self.value


class Family:
    """A counter or gauge with its children by label values (created on first `labels`)."""

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Labels = (),
        kind: Literal["counter", "gauge"] = "counter",
        agg: Literal["sum", "max"] = "sum",
    ) -> None:
        self.name, self.doc, self.labelnames, self.kind, self.agg = (
            name,
            doc,
            labelnames,
            kind,
            agg,
        )
        self.children: dict[Labels, _Value] = {}
        self._fn: Callable[[], float] | None = None
        self._unlabelled = None if labelnames else self.labels()

    def labels(self, *values: str) -> _Value:
        key = tuple(map(str, values))
        child = self.children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
            child = self.children[key] = _Value()
        return child

    def inc(self, n: float = 1) -> None:
        assert self._unlabelled is not None, f"{self.name} has labels"
        self._unlabelled.value += n

    def set_function(self, fn: Callable[[], float]) -> None:
        """The unlabelled value is `fn()` at each snapshot (a gauge of live state)."""
        self._fn = fn

    def rows(self) -> list[list[Any]]:
        if self._fn is not None and self._unlabelled is not None:
            self._unlabelled.value = float(self._fn())
        return [[list(k), c.value] for k, c in self.children.items()]


class _Buckets:
    """One labelled histogram: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_BUCKETS, seconds)] += 1  # le is inclusive: first bound >= v
        self.sum += seconds


class Histogram:
    """A histogram family over the fixed latency buckets."""

    def __init__(self, name: str, doc: str, labelnames: Labels) -> None:
        self.name, self.doc, self.labelnames = name, doc, labelnames
        self.children: dict[Labels, _Buckets] = {}

    def labels(self, *values: str) -> _Buckets:
        key = tuple(map(str, values))
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = _Buckets()
        return child

    def rows(self) -> list[list[Any]]:
        return [[list(k), list(c.counts), c.sum] for k, c in self.children.items()]


class Metrics:
    """Latency per route; cache events per tier and group; tier errors; breaker states;
    connections and the hostile-client events counted instead of logged one by one."""

    def __init__(self) -> None:
        self.latency = Histogram(
            "featureplane_http_request_seconds", "HTTP request latency", ("route", "status")
        )
        self.cache = Family(
            "featureplane_cache_events",
            "Cache events: hit, miss, negative_hit, stale, "
            "early_refresh, unanswerable (held but cannot answer exactly)",
            ("tier", "group", "event"),
        )
        self.errors = Family(
            "featureplane_tier_errors", "Failed or timed-out tier calls", ("tier", "op")
        )
        self.breaker = Family(
            "featureplane_breaker_state",
            "Circuit breaker per tier: 0 closed, 1 open, 2 half-open",
            ("tier",),
            kind="gauge",
            agg="max",
        )
        self.on_demand_errors = Family(
            "featureplane_on_demand_errors", "On-demand functions that raised", ("group",)
        )
        self.connections = Family(
            "featureplane_http_connections", "Open HTTP connections", kind="gauge"
        )
        self.refused = Family(
            "featureplane_http_connections_refused",
            "Connections answered 503 and closed at once because the server held --max-connections",
        )
        self.slow_clients = Family(
            "featureplane_http_slow_clients",
            "Requests whose body did not arrive within --body-timeout (answered 408, disconnected)",
        )
        self.protocol_errors = Family(
            "featureplane_http_protocol_errors",
            "Requests refused by the HTTP parser (bad "
            "request line, header too long, ...), answered 400 before any route",
        )
        # serving/invalidate.py: the local tier's invalidation channel
        self.invalidation_messages = Family(
            "featureplane_invalidation_messages",
            "Messages heard on the invalidation channel, by outcome (ok; garbled: not an "
            "invalidation, ignored)",
            ("outcome",),
        )
        self.invalidated_keys = Family(
            "featureplane_invalidated_keys", "Keys the invalidation messages named"
        )
        self.invalidation_subscribes = Family(
            "featureplane_invalidation_subscribes",
            "(Re)subscriptions to the invalidation channel, each clearing the local tier",
        )
        self.invalidation_subscribed = Family(
            "featureplane_invalidation_subscribed",
            "1 while subscribed to the invalidation channel (summed over workers)",
            kind="gauge",
        )
        self.families = [
            self.cache,
            self.errors,
            self.breaker,
            self.on_demand_errors,
            self.connections,
            self.refused,
            self.slow_clients,
            self.protocol_errors,
            self.invalidation_messages,
            self.invalidated_keys,
            self.invalidation_subscribes,
            self.invalidation_subscribed,
        ]
        self._events = self.cache.children
        self._latency: dict[tuple[str, int], _Buckets] = {}
        self._shared: tuple[Path, Path] | None = None

    def event(self, tier: str, group: str, event: str, n: int = 1) -> None:
        child = self._events.get((tier, group, event))
        if child is None:
            child = self.cache.labels(tier, group, event)
        child.value += n

    def observe(self, route: str, status: int, seconds: float) -> None:
        child = self._latency.get((route, status))
        if child is None:
            child = self._latency[(route, status)] = self.latency.labels(route, str(status))
        child.counts[bisect_left(_BUCKETS, seconds)] += 1
        child.sum += seconds

    def snapshot(self) -> Snapshot:
        """This process's numbers, as plain lists (what `share` writes)."""
        return {
            "c": {f.name: f.rows() for f in self.families if f.kind == "counter"},
            "g": {f.name: f.rows() for f in self.families if f.kind == "gauge"},
            "h": {self.latency.name: self.latency.rows()},
        }

    def share(self, directory: Path, name: str) -> None:
        """Write snapshots to `directory`/`name`.json and render the sum of the directory."""
        self._shared = (directory, directory / f"{name}.json")
        self.write_snapshot()

    def write_snapshot(self) -> None:
        """Replace this worker's snapshot file at once (a reader never sees half of one)."""
        if self._shared is None:
            return
        path = self._shared[1]
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(self.snapshot()))
        os.replace(tmp, path)

    def render(self) -> bytes:
        """Prometheus text of this process, or of every worker once `share`d."""
        if self._shared is None:
            merged = self.snapshot()
        else:
            self.write_snapshot()
            maxed = frozenset(f.name for f in self.families if f.agg == "max")
            merged = _merge(self._shared[0], maxed)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, merged))
        return generate_latest(registry)


def retire(directory: Path, name: str) -> None:
    """A worker `name` ended: keep its counts in the sums, drop its gauges."""
    path = directory / f"{name}.json"
    if path.exists():
        os.replace(path, directory / f"{name}{_DEAD}")


def _merge(directory: Path, max_gauges: frozenset[str]) -> Snapshot:
    """The sum over the snapshots in `directory`; gauges over the live ones only, those in
    `max_gauges` their maximum (a state, not an amount)."""
    sums: dict[str, dict[str, dict[Labels, Any]]] = {"c": {}, "g": {}, "h": {}}
    for path in sorted(directory.glob("*.json")):
        try:
            snap: Snapshot = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue  # retired between listing and reading: the next scrape has it
        for kind in ("c", "g", "h") if not path.name.endswith(_DEAD) else ("c", "h"):
            for name, rows in snap.get(kind, {}).items():
                into = sums[kind].setdefault(name, {})
                for row in rows:
                    key = tuple(row[0])
                    old = into.get(key)
                    if old is None:
                        into[key] = row[1:]
                    elif kind == "h":
                        counts = [a + b for a, b in zip(old[0], row[1], strict=True)]
                        into[key] = [counts, old[1] + row[2]]
                    elif name in max_gauges:
                        into[key] = [max(old[0], row[1])]
                    else:
                        into[key] = [old[0] + row[1]]
    return {
        kind: {n: [[list(k), *v] for k, v in rows.items()] for n, rows in by_name.items()}
        for kind, by_name in sums.items()
    }


class _Collector:
    """Turns a (merged) snapshot into prometheus_client metric families."""

    def __init__(self, metrics: Metrics, snap: Snapshot) -> None:
        self._metrics, self._snap = metrics, snap

    def collect(self) -> Iterator[Metric]:
        for f in self._metrics.families:
            rows = self._snap["c" if f.kind == "counter" else "g"].get(f.name, [])
            family: CounterMetricFamily | GaugeMetricFamily
            if f.kind == "counter":
                family = CounterMetricFamily(f.name, f.doc, labels=f.labelnames)
            else:
                family = GaugeMetricFamily(f.name, f.doc, labels=f.labelnames)
            for labels, value in rows:
                family.add_metric(labels, value)
            yield family
        h = self._metrics.latency
        hist = HistogramMetricFamily(h.name, h.doc, labels=h.labelnames)
        for labels, counts, total in self._snap["h"].get(h.name, []):
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, _BUCKETS), "+Inf"), counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            hist.add_metric(labels, buckets, total)
        yield hist

"""Prometheus metrics of the server, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0)


class Metrics:
    """Latency per route; cache events per tier and group; tier errors; breaker states;
    connections and the hostile-client events counted instead of logged one by one.

    Label children are cached, so the hot path pays a dict lookup, not a label lookup.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "featureplane_http_request_seconds",
            "HTTP request latency",
            ["route", "status"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.cache = Counter(
            "featureplane_cache_events",
            "Cache events: hit, miss, negative_hit, stale, "
            "early_refresh, unanswerable (held but cannot answer exactly)",
            ["tier", "group", "event"],
            registry=self.registry,
        )
        self.errors = Counter(
            "featureplane_tier_errors",
            "Failed or timed-out tier calls",
            ["tier", "op"],
            registry=self.registry,
        )
        self.breaker = Gauge(
            "featureplane_breaker_state",
            "Circuit breaker per tier: 0 closed, 1 open, 2 half-open",
            ["tier"],
            registry=self.registry,
        )
        self.on_demand_errors = Counter(
            "featureplane_on_demand_errors",
            "On-demand functions that raised",
            ["group"],
            registry=self.registry,
        )
        self.connections = Gauge(
            "featureplane_http_connections",
            "Open HTTP connections",
            registry=self.registry,
        )
        self.refused = Counter(
            "featureplane_http_connections_refused",
            "Connections answered 503 and closed at once because the server held --max-connections",
            registry=self.registry,
        )
        self.slow_clients = Counter(
            "featureplane_http_slow_clients",
            "Requests whose body did not arrive within --body-timeout (answered 408, disconnected)",
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "featureplane_http_protocol_errors",
            "Requests refused by the HTTP parser (bad "
            "request line, header too long, ...), answered 400 before any route",
            registry=self.registry,
        )
        # serving/invalidate.py: the local tier's invalidation channel
        self.invalidation_messages = Counter(
            "featureplane_invalidation_messages",
            "Messages heard on the invalidation channel, by outcome (ok; garbled: not an "
            "invalidation, ignored)",
            ["outcome"],
            registry=self.registry,
        )
        self.invalidated_keys = Counter(
            "featureplane_invalidated_keys",
            "Keys the invalidation messages named",
            registry=self.registry,
        )
        self.invalidation_subscribes = Counter(
            "featureplane_invalidation_subscribes",
            "(Re)subscriptions to the invalidation channel, each clearing the local tier",
            registry=self.registry,
        )
        self.invalidation_subscribed = Gauge(
            "featureplane_invalidation_subscribed",
            "1 while subscribed to the invalidation channel (summed over workers)",
            registry=self.registry,
        )
        self._events: dict[tuple[str, str, str], Counter] = {}
        self._latency: dict[tuple[str, int], Histogram] = {}

    def event(self, tier: str, group: str, event: str, n: int = 1) -> None:
        key = (tier, group, event)
        child = self._events.get(key)
        if child is None:
            child = self._events[key] = self.cache.labels(tier, group, event)
        child.inc(n)

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        child = self._latency.get(key)
        if child is None:
            child = self._latency[key] = self.latency.labels(route, str(status))
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""The catalog's live figures: quantiles as Prometheus computes them, windows over scrapes
(counter resets, sources that vanish or never answer), and a Prometheus server's answers."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from featureplane.serving.figures import (
    Endpoints,
    Prometheus,
    Window,
    group_figures,
    job_states,
    quantile,
    topic_figures,
)
from tests.services import free_port

INF = math.inf


def test_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, INF: 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.1 + 0.4 * 20 / 40)
    assert quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * 9 / 10)
    assert quantile(0.25, buckets) == pytest.approx(0.05)  # from 0 to the first bound
    assert quantile(0.99, {0.1: 1.0, INF: 10.0}) == 0.1  # in +Inf: the last finite bound
    assert quantile(0.5, {0.1: 0.0, INF: 0.0}) is None  # nothing observed
    assert quantile(0.5, {}) is None
    assert quantile(0.5, {0.1: 3.0}) is None  # no +Inf bucket: not a histogram


def _page(written: float, hits: float, fresh: list[float], dlq: float = 0) -> bytes:
    reg = CollectorRegistry()
    Counter(
        "featureplane_ingest_items_written", "", ["flow", "group", "tier"], registry=reg
    ).labels("ingest", "g", "store").inc(written)
    Counter("featureplane_cache_events", "", ["tier", "group", "event"], registry=reg).labels(
        "local", "g", "hit"
    ).inc(hits)
    Counter("featureplane_ingest_dlq", "", ["flow", "topic"], registry=reg).labels(
        "ingest", "t"
    ).inc(dlq)
    h = Histogram(
        "featureplane_ingest_freshness_seconds",
        "",
        ["flow", "group"],
        buckets=(0.1, 1),
        registry=reg,
    )
    for v in fresh:
        h.labels("ingest", "g").observe(v)
    Gauge("featureplane_batch_run_state", "", ["job", "state"], registry=reg).labels(
        "j", "failed"
    ).set(1)
    Counter("unrelated", "", registry=reg).inc()
    return generate_latest(reg)


async def test_a_window_is_what_grew_between_the_oldest_kept_scrape_and_now() -> None:
    now = [0.0]
    pages = [_page(100, 10, [0.05] * 10)]
    source = Endpoints([], local=lambda: pages[-1], clock=lambda: now[0])
    first = await source.window()
    assert first.seconds is None  # one scrape: since the process started
    f = group_figures(first, "g")
    assert (f.items_written, f.items_per_minute) == (100, None)
    assert f.freshness_p99 == pytest.approx(0.099)

    now[0] = 30.0
    pages.append(_page(160, 40, [0.05] * 10 + [0.5] * 10))
    w = await source.window()
    assert w.seconds == 30.0
    f = group_figures(w, "g")
    assert (f.items_written, f.items_per_minute) == (60, 120)
    assert f.freshness_p50 == pytest.approx(0.55)  # only the 10 new ones, all in (0.1, 1]
    assert f.tiers == {"local": {"hit": 30.0}} and f.hit_rate("local") == 1.0
    assert job_states(w) == {"j": "failed"}
    assert not any(k[0] == "unrelated_total" for k in w.increases)

    now[0] = 31.0  # within 2 s of the last scrape: not scraped again
    pages.append(_page(0, 0, []))
    assert (await source.window()).seconds == 30.0
    now[0] = 60.0  # a restart: the counters went down, so they grew by what they hold now
    pages.append(_page(5, 0, []))
    assert group_figures(await source.window(), "g").items_written == 60 + 5


async def test_a_source_that_is_down_or_hangs_is_named_and_the_rest_still_count() -> None:
    hang = web.Application()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="")

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="{not prometheus")

    hang.router.add_get("/slow", slow)
    hang.router.add_get("/garbage", garbage)
    runner = web.AppRunner(hang)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    closed = free_port()
    source = Endpoints(
        [
            f"http://127.0.0.1:{closed}/metrics",
            f"http://127.0.0.1:{port}/slow",
            f"http://127.0.0.1:{port}/garbage",
            f"http://127.0.0.1:{port}/nothing",
        ],
        local=lambda: _page(7, 0, [], dlq=3),
    )
    try:
        w = await source.window()
    finally:
        await source.aclose()
        await runner.cleanup()
    assert group_figures(w, "g").items_written == 7
    assert topic_figures(w, "t").dead_lettered == 3
    why = "\n".join(w.missing)
    assert len(w.missing) == 4, why
    assert f"{closed}/metrics: " in why
    assert "/slow: no answer within 1 s" in why
    assert "/nothing: HTTP 404" in why


async def test_prometheus_answers_become_the_same_window() -> None:
    asked: list[str] = []

    async def query(request: web.Request) -> web.Response:
        q = request.query["query"]
        asked.append(q)
        if "items_written" in q:
            rows: list[dict[str, Any]] = [
                {"metric": {"group": "g", "tier": "store", "pod": "a"}, "value": [0, "30"]},
                {"metric": {"group": "g", "tier": "store", "pod": "b"}, "value": [0, "30"]},
                {"metric": {"group": "g", "tier": "redis"}, "value": [0, "NaN"]},
            ]
            return web.json_response({"status": "success", "data": {"result": rows}})
        if "records" in q:
            return web.json_response({"status": "error", "error": "bad query"}, status=400)
        return web.json_response({"status": "success", "data": {"result": []}})

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    source = Prometheus(f"http://127.0.0.1:{port}/")
    try:
        w = await source.window()
    finally:
        await source.aclose()
        await runner.cleanup()
    assert "increase(featureplane_ingest_items_written_total[5m])" in asked
    f = group_figures(w, "g")
    assert (f.items_written, f.items_per_minute) == (60, 12)
    assert w.missing == ("Prometheus (featureplane_ingest_records_total): bad query",)


def test_figures_of_an_empty_window_are_unavailable_not_zero_rates() -> None:
    f = group_figures(Window(None, {}, {}), "g")
    assert (f.freshness_p99, f.items_per_minute, f.hit_rate("local")) == (None, None, None)
    t = topic_figures(Window(None, {}, {}), "t")
    assert t.records_per_minute is None

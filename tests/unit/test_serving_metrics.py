"""The server's metrics: plain numbers rendered as before, summed over workers' snapshots;
the worker count from CPU affinity and cgroup quotas."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from featureplane.serving.metrics import Metrics, retire
from featureplane.serving.workers import cgroup_cpu_limit


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def value(text: bytes, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def test_exposition_keeps_names_labels_and_buckets() -> None:
    m = Metrics()
    m.event("local", "g", "hit")
    m.event("local", "g", "hit", 2)
    m.observe("/v1/features", 200, 0.001)  # on a bound: counted in le="0.001"
    m.observe("/v1/features", 200, 0.003)
    m.observe("/v1/features", 200, 5.0)  # past the last bound: +Inf only
    m.errors.labels("redis", "read").inc()
    m.breaker.labels("redis").set(1)
    m.refused.inc()
    m.connections.set_function(lambda: 7)
    text = m.render()
    assert value(text, "featureplane_cache_events_total", tier="local", group="g", event="hit") == 3
    route = {"route": "/v1/features", "status": "200"}
    assert value(text, "featureplane_http_request_seconds_bucket", le="0.0005", **route) == 0
    assert value(text, "featureplane_http_request_seconds_bucket", le="0.001", **route) == 1
    assert value(text, "featureplane_http_request_seconds_bucket", le="0.004", **route) == 2
    assert value(text, "featureplane_http_request_seconds_bucket", le="1.0", **route) == 2
    assert value(text, "featureplane_http_request_seconds_bucket", le="+Inf", **route) == 3
    assert value(text, "featureplane_http_request_seconds_count", **route) == 3
    assert value(text, "featureplane_http_request_seconds_sum", **route) == 5.004
    assert value(text, "featureplane_tier_errors_total", tier="redis", op="read") == 1
    assert value(text, "featureplane_breaker_state", tier="redis") == 1
    assert value(text, "featureplane_http_connections_refused_total") == 1
    assert value(text, "featureplane_http_connections") == 7
    # Unlabelled counters exist from the start, as prometheus_client's did.
    assert value(text, "featureplane_http_slow_clients_total") == 0
    assert b"# HELP featureplane_tier_errors_total Failed or timed-out tier calls" in text


def test_shared_render_sums_workers_and_keeps_the_dead_ones_counts(tmp_path: Path) -> None:
    a, b, c = Metrics(), Metrics(), Metrics()
    for m, name in ((a, "1"), (b, "2"), (c, "3")):
        m.share(tmp_path, name)
    a.event("redis", "g", "miss", 2)
    b.event("redis", "g", "miss", 3)
    c.event("redis", "g", "miss", 4)
    a.observe("/healthz", 200, 0.0001)
    b.observe("/healthz", 200, 0.0001)
    a.connections.set_function(lambda: 2)
    b.connections.set_function(lambda: 5)
    c.connections.set_function(lambda: 100)
    a.breaker.labels("redis").set(0)
    b.breaker.labels("redis").set(2)
    c.breaker.labels("redis").set(1)
    for m in (a, b, c):
        m.write_snapshot()
    retire(tmp_path, "3")  # worker 3 died: its counts stay, its gauges go

    text = a.render()  # a scrape on worker 1 writes its own numbers first
    assert (
        value(text, "featureplane_cache_events_total", tier="redis", group="g", event="miss") == 9
    )
    assert (
        value(text, "featureplane_http_request_seconds_count", route="/healthz", status="200") == 2
    )
    assert value(text, "featureplane_http_connections") == 7  # summed over the live ones
    assert value(text, "featureplane_breaker_state", tier="redis") == 2  # the worst live one

    a.event("redis", "g", "miss")  # not yet flushed: the scrape on worker 1 still sees it
    assert (
        value(a.render(), "featureplane_cache_events_total", tier="redis", group="g", event="miss")
        == 10
    )


def test_cgroup_v2_quota_is_the_tightest_of_the_cgroup_and_its_parents(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    root = tmp_path / "fs"
    (root / "kubepods/pod1/ctr").mkdir(parents=True)
    (root / "kubepods/pod1/ctr/cpu.max").write_text("max 100000\n")
    (root / "kubepods/pod1/cpu.max").write_text("250000 100000\n")
    (root / "kubepods/cpu.max").write_text("400000 100000\n")
    assert cgroup_cpu_limit(proc, root) == 2.5
    (root / "kubepods/pod1/cpu.max").write_text("max 100000\n")
    (root / "kubepods/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(proc, root) is None


def test_cgroup_v1_quota_in_a_container_whose_mount_is_its_own_cgroup(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    # The path names the cgroup from the host; inside the container the mount is its root.
    proc.write_text("5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    mount = tmp_path / "fs/cpu,cpuacct"
    mount.mkdir(parents=True)
    (mount / "cpu.cfs_quota_us").write_text("200000\n")
    (mount / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(proc, tmp_path / "fs") == 2.0
    (mount / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert cgroup_cpu_limit(proc, tmp_path / "fs") is None
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path / "fs") is None

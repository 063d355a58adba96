"""The public names of every module of ours, pinned.

Every public module (no part of its name starts with `_`) declares `__all__`, every name
in it exists, and the names are the ones written below: a change to the public surface
shows up here as a diff. After a deliberate change, print the current names with
`python -m tests.test_exported_members` and paste them over EXPECTED.

The modules are imported in a child process, so what they set up when imported (Bytewax,
metrics registries) stays out of this test process.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_layers import ROOT, modules

PROBE = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    names = getattr(module, "__all__", None)
    out[name] = {
        "all": None if names is None else list(names),
        "missing": [n for n in names or () if not hasattr(module, n)],
    }
print(json.dumps(out))
"""

EXPECTED: dict[str, list[str]] = {
    "featureplane": ["__version__"],
    "featureplane.backoff": ["backoff_ms"],
    "featureplane.batch": [],
    "featureplane.batch.backfill": ["BackfillJob", "backfill", "run", "survey"],
    "featureplane.batch.dlq": [
        "BATCH",
        "DeadLetter",
        "Dlq",
        "REDRIVE_OF",
        "REDRIVE_SPEC",
        "Ranges",
        "newest",
        "partitions",
    ],
    "featureplane.batch.load": [
        "LoadJob",
        "LoadResult",
        "Reject",
        "item_of",
        "load",
        "load_shard",
        "run",
        "write_rejects",
    ],
    "featureplane.batch.metrics": [
        "ENGINE_INSTANCE",
        "JobMetrics",
        "PUSH_TIMEOUT_S",
        "STATES",
        "job_metrics",
        "push_job",
        "push_shard",
        "push_started",
        "registry_of",
        "report",
        "snapshot",
        "write_textfile",
    ],
    "featureplane.batch.plan": ["job_named", "plan_jobs", "run"],
    "featureplane.batch.pods": [
        "ACCOUNT",
        "Doc",
        "LABELS",
        "RETRIES",
        "SHARD_RESOURCES",
        "STEP_RESOURCES",
        "batch_env",
        "container",
        "job_args",
        "metadata",
        "pod_security",
        "slug",
        "timeout_s",
        "volumes",
    ],
    "featureplane.batch.progress": ["JobBoard", "JobLine", "Progress"],
    "featureplane.batch.redrive": [
        "RedriveJob",
        "Tally",
        "choose",
        "redrive",
        "run",
        "source_topic",
        "spec_hash",
        "summary",
    ],
    "featureplane.batch.render": [
        "HEADER",
        "k8s_refused",
        "render_argo",
        "render_k8s",
        "run",
        "to_yaml",
    ],
    "featureplane.batch.render_argo": ["PLAN_DEADLINE_S", "REPORT_DEADLINE_S", "render_argo"],
    "featureplane.batch.runner": ["PlanFn", "ShardFn", "run"],
    "featureplane.batch.runs": [
        "JobRecord",
        "JobState",
        "RunRecord",
        "RunState",
        "Runs",
        "SPEED_SAMPLES",
        "ShardRecord",
        "ShardState",
        "last_runs",
        "measured_speed",
        "pid_alive",
    ],
    "featureplane.batch.shards": [
        "DEFAULT_SPEED",
        "JobPlan",
        "LineCutter",
        "MIN_RANGE",
        "Piece",
        "ShardResult",
        "backfill_units",
        "cut",
        "plan_job",
        "run_shard",
        "split",
    ],
    "featureplane.batch.sink": ["Sink"],
    "featureplane.batch.sources": [
        "Format",
        "Row",
        "list_files",
        "open_s3",
        "pieces",
        "rows",
        "s3_errors",
        "unreadable",
    ],
    "featureplane.batch.status": ["duration_text", "run_summary", "status"],
    "featureplane.batch.workers": ["STOP_GRACE_S", "ShardFn", "Worker", "Workers", "died"],
    "featureplane.cache": ["CacheFill", "CacheTier", "Cached"],
    "featureplane.cli": ["main"],
    "featureplane.cli.broker": [
        "Service",
        "ServiceError",
        "find_binary",
        "free_port",
        "start_process",
        "start_tansu",
    ],
    "featureplane.cli.commands": [
        "backfill",
        "batch",
        "batch_plan",
        "batch_render",
        "batch_report",
        "batch_run",
        "batch_status",
        "demo_events",
        "ingest",
        "load",
        "redrive",
        "retry",
        "serve",
        "up",
        "validate",
    ],
    "featureplane.cli.demo": ["events", "run", "write_samples"],
    "featureplane.cli.flags": [
        "BadSettingError",
        "ENV_ONLY",
        "FLAG_NAMES",
        "add_flags",
        "env_name",
        "flag_name",
        "model_from",
        "unknown_variables",
    ],
    "featureplane.cli.parser": [
        "COMMANDS",
        "build_parser",
        "parse_shard",
        "parse_time",
        "settings_models",
    ],
    "featureplane.cli.up": [
        "Child",
        "DEMO_GROUP",
        "DRAIN",
        "EXAMPLES",
        "UpSettings",
        "banner",
        "demo_batch",
        "plan_children",
        "run",
        "stop_timeout",
        "wrote_items",
    ],
    "featureplane.cli.validate": ["run"],
    "featureplane.codec": [
        "Item",
        "MAX_ITEM_BYTES",
        "PACKED",
        "Record",
        "decode",
        "decode_many",
        "decode_python",
        "encode",
        "make_item",
        "project",
    ],
    "featureplane.errors": [
        "FeatureplaneError",
        "ItemTooLargeError",
        "MalformedError",
        "NotStartedError",
        "SpecError",
        "SpecProblem",
        "StartupError",
        "StoreError",
        "TransientStoreError",
        "UnknownGroupError",
        "ValidationError",
        "quote",
    ],
    "featureplane.examples": [],
    "featureplane.examples.context": ["request_time"],
    "featureplane.flows": [],
    "featureplane.flows.dataflow": [
        "Built",
        "build",
        "module_flow",
        "prepare_topics",
        "process_metrics",
        "run",
        "worker_factory",
    ],
    "featureplane.flows.ingest": ["flow", "run"],
    "featureplane.flows.options": ["FlowOptions", "METRICS_PORTS", "RETRY_FIELDS"],
    "featureplane.flows.retry": ["flow", "run"],
    "featureplane.flows.source": ["GroupPartition", "GroupSource"],
    "featureplane.invalidation": [
        "InvalidMessageError",
        "MAX_MESSAGE_BYTES",
        "Publisher",
        "channel_of",
        "decode",
        "encode",
        "local_groups",
        "publisher_of",
    ],
    "featureplane.jobs": [
        "BackfillSource",
        "BatchJob",
        "DEFAULT_TIMEOUT_MS",
        "LoadSource",
        "cron_fires",
        "cron_latest",
        "cron_period_ms",
        "format_of",
        "iso_time",
        "job_named",
        "needed",
        "resolve_source",
        "resolve_time",
        "schedule_runs",
        "select",
    ],
    "featureplane.kafka_config": [
        "KafkaConfig",
        "MSK_IAM",
        "RESERVED",
        "SHOWN",
        "Value",
        "msk_iam_token",
    ],
    "featureplane.keys": [
        "MAX_ID_BYTES",
        "MAX_TS",
        "NULL_SK",
        "Versioned",
        "check_id",
        "newest",
        "partition_key",
        "replaces",
        "ts_of",
        "version",
        "version_bounds",
    ],
    "featureplane.lifecycle": [
        "STOP",
        "broker_error",
        "cannot_listen",
        "check_kafka_reachable",
        "check_port_free",
        "die_with_parent",
        "install_stop_handlers",
    ],
    "featureplane.operators": [],
    "featureplane.operators.aggregate": ["Aggregator"],
    "featureplane.operators.commit": ["OffsetTracker"],
    "featureplane.operators.decode": ["decode_event", "decode_works"],
    "featureplane.operators.dispatch": ["Dispatcher", "MISSING", "get_parts", "get_path"],
    "featureplane.operators.handoff": ["Delivery", "HandOff", "SMALL_MESSAGE", "abandon"],
    "featureplane.operators.kafka": ["Deliverer", "GroupConsumer", "range_reader"],
    "featureplane.operators.kafka_cluster": [
        "Cluster",
        "KAFKA_DEFAULT_MAX_MESSAGE_BYTES",
        "KafkaCluster",
        "cluster_of",
        "ensure_topics",
        "log_error",
        "max_message_bytes",
        "topic_partitions",
    ],
    "featureplane.operators.metrics": ["BulkHistogram", "IngestMetrics", "serve_metrics"],
    "featureplane.operators.pipeline": ["Pipeline", "PipelineConfig", "Worker"],
    "featureplane.operators.policy": [
        "Failure",
        "RetryInPlace",
        "RetryPolicy",
        "ToRetryTopic",
        "classify",
        "targets",
    ],
    "featureplane.operators.records": ["Event", "Message", "Origin", "Status", "Work"],
    "featureplane.operators.retry": ["Backoff", "RetryHold"],
    "featureplane.operators.route": [
        "Abandon",
        "DLQ_SUFFIX",
        "Outgoing",
        "RECORD_OVERHEAD",
        "RETRY_SUFFIX",
        "RetryHeaders",
        "TIERS_HEADER",
        "dead_letter",
        "dlq_topic",
        "fit",
        "parse_retry_headers",
        "retry_topic",
        "route_of",
        "wire_size",
    ],
    "featureplane.operators.write": ["CacheWriter", "Writer"],
    "featureplane.serving": [],
    "featureplane.serving.api": [
        "ApiError",
        "DEFAULT_LIMIT",
        "FeatureRequest",
        "MAX_PAIRS",
        "limit_maximum",
        "parse_body",
        "parse_query",
        "render",
        "render_json",
    ],
    "featureplane.serving.app": ["MAX_BODY", "METRICS", "READER", "SERVER", "create_app", "drain"],
    "featureplane.serving.breaker": ["Breaker", "BreakerState", "monotonic_ms"],
    "featureplane.serving.catalog": [
        "CatalogPages",
        "CatalogParts",
        "FIGURES_WAIT_S",
        "Graph",
        "Letters",
        "graph_of",
    ],
    "featureplane.serving.coalesce": ["Coalescer"],
    "featureplane.serving.config": ["ServeConfig"],
    "featureplane.serving.connections": ["ConnectionGuard", "fit_to_fd_limit"],
    "featureplane.serving.figures": [
        "Endpoints",
        "FAMILIES",
        "GroupFigures",
        "Prometheus",
        "Source",
        "TopicFigures",
        "Window",
        "group_figures",
        "job_states",
        "quantile",
        "topic_figures",
    ],
    "featureplane.serving.fills": ["FillQueue"],
    "featureplane.serving.flight": ["Background", "Flight", "SingleFlight"],
    "featureplane.serving.freshness": [
        "Entry",
        "Freshness",
        "Rendered",
        "answer",
        "entry_from_cache",
        "entry_from_store",
        "freshness",
        "negative_entry",
        "rebased",
        "xfetch",
    ],
    "featureplane.serving.guarded": ["GuardedTier"],
    "featureplane.serving.invalidate": [
        "InvalidatedCache",
        "Refresher",
        "SUBSCRIBER",
        "Subscriber",
        "local_tier",
        "subscriber_of",
    ],
    "featureplane.serving.local": ["LocalCache"],
    "featureplane.serving.logs": ["RateLimitedLog"],
    "featureplane.serving.main": ["run", "serve"],
    "featureplane.serving.metrics": ["CONTENT_TYPE", "Family", "Histogram", "Metrics", "retire"],
    "featureplane.serving.ondemand": ["OnDemandError", "compute", "load_functions"],
    "featureplane.serving.openapi": ["openapi"],
    "featureplane.serving.plan": ["Key", "Wanted", "plan"],
    "featureplane.serving.tiers": ["ReaderConfig", "TieredReader"],
    "featureplane.serving.workers": [
        "MAX_RESTARTS",
        "RESTART_WINDOW_S",
        "Supervisor",
        "available_cores",
        "cgroup_cpu_limit",
    ],
    "featureplane.settings": ["DURATION", "Duration", "Settings", "format_duration", "to_ms"],
    "featureplane.spec": [
        "Catalog",
        "Feature",
        "FeatureGroup",
        "IngestionRule",
        "SpecNotFoundError",
        "TTL",
        "load_catalog",
        "parse_duration",
    ],
    "featureplane.stores": ["Query", "Store", "open_cache", "open_store"],
    "featureplane.stores.base": [
        "Clock",
        "Query",
        "Store",
        "Window",
        "clamp",
        "cutoff",
        "group_of",
        "oldest_kept",
        "wall_clock_ms",
        "window",
    ],
    "featureplane.stores.dynamodb": ["DynamoStore"],
    "featureplane.stores.dynamodb_requests": [
        "CRC_MISMATCH",
        "Call",
        "DynamoWireError",
        "MAX_ATTEMPTS",
        "READ_CHUNK",
        "WRITE_CHUNK",
        "batch_get_all",
        "batch_write_all",
        "chunked",
        "expiry_s",
        "item_attrs",
        "item_key",
        "map_error",
        "newest_per_key",
        "record_of",
        "unique_puts",
    ],
    "featureplane.stores.embedded": ["EmbeddedStore"],
    "featureplane.stores.redis": ["RedisStore"],
    "featureplane.stores.redis_cache": ["RedisCache"],
    "featureplane.stores.redis_layout": [
        "Call",
        "NEGATIVE_SUFFIX",
        "THROUGH_KEYS",
        "ThroughEntry",
        "VERSION_LEN",
        "by_slot",
        "check_prefix",
        "key_of",
        "lex_range",
        "member_of",
        "negative_key_of",
        "record_of",
        "records_of",
        "stored_of",
        "through_call",
        "through_chunks",
        "timeseries_members",
    ],
    "featureplane.ttl": ["Rand", "jittered"],
    "featureplane.types": [
        "FeatureType",
        "INT_MAX",
        "INT_MIN",
        "MAX_ITEM_BYTES",
        "MAX_VECTOR_DIM",
        "PACKED_HEAD_BYTES",
        "coerce",
        "pack_vector",
        "packed_floor",
        "parse_type",
        "to_python",
        "unpack_vector",
    ],
}


def public_modules() -> list[str]:
    return sorted(
        name for name in modules() if not any(part.startswith("_") for part in name.split("."))
    )


def exported() -> dict[str, dict[str, object]]:
    """Module name -> {"all": its __all__ or None, "missing": names in it it lacks}, or
    {"error": why it did not import}."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *public_modules()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, dict[str, object]] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_every_public_module_declares_all_of_names_it_has() -> None:
    found = exported()
    assert len(found) >= 40
    problems = []
    for name, info in found.items():
        if "error" in info:
            problems.append(f"{name}: does not import: {info['error']}")
        elif info["all"] is None:
            problems.append(f"{name}: no __all__")
        else:
            names = info["all"]
            assert isinstance(names, list)
            if info["missing"]:
                problems.append(f"{name}: __all__ names what it lacks: {info['missing']}")
            if len(set(names)) != len(names):
                problems.append(f"{name}: __all__ names something twice: {names}")
    assert not problems, "\n".join(problems)


def test_public_names_are_pinned() -> None:
    current = {
        name: sorted(info["all"])  # type: ignore[call-overload]
        for name, info in exported().items()
        if isinstance(info.get("all"), list)
    }
    assert current == EXPECTED


if __name__ == "__main__":
    names = {
        name: sorted(info["all"])  # type: ignore[call-overload]
        for name, info in exported().items()
        if isinstance(info.get("all"), list)
    }
    print("EXPECTED: dict[str, list[str]] = {")
    for name, members in sorted(names.items()):
        print(f"    {json.dumps(name)}: {json.dumps(members)},")
    print("}")

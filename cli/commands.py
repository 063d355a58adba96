"""What each `featureplane` command runs: its settings from the parsed flags, then its part.

A command's docstring is its `--help` description (the first line its summary
in `featureplane --help`). Each part is imported inside its command, so a
command loads only what it runs: `validate` no Kafka, Bytewax, aiohttp or
Redis client.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import TYPE_CHECKING

from featureplane.cli.flags import model_from
from featureplane.flows.options import FlowOptions
from featureplane.jobs import resolve_source, resolve_time
from featureplane.serving.config import ServeConfig
from featureplane.settings import Settings
from featureplane.spec import Catalog, load_catalog

if TYPE_CHECKING:
    from featureplane.serving.catalog import CatalogParts

__all__ = [
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
]


def now_ms() -> int:
    return int(time.time() * 1000)


def up(args: argparse.Namespace) -> int:
    """Run the whole platform on this machine on embedded defaults.

    Starts, supervises and stops together: the embedded Kafka-compatible broker
    (tansu; skipped when FEATUREPLANE_KAFKA_BOOTSTRAP or --bootstrap names one),
    the ingest and retry dataflows, and the HTTP server, all on the embedded
    store in --data-dir (plus the Redis tier when FEATUREPLANE_REDIS_URL is set).
    Before starting anything it checks that the HTTP port is free and that a
    named broker answers, and says in one line what to change if not. It
    creates the topics the spec needs, waits until every part is ready (with
    --demo, until ingestion wrote its first features), prints what runs
    where, restarts a part that dies (at most 3 times a
    minute, else it exits non-zero with the reason) and stops everything on
    Ctrl-C or SIGTERM: the dataflows get 10s to finish the records in flight
    (FEATUREPLANE_DRAIN_TIMEOUT) and 20s more to commit and close before they
    are killed. Their metrics listen on 127.0.0.1 only. With --demo it uses the
    example catalog (unless --spec or FEATUREPLANE_SPEC names one) and feeds a
    steady stream of sample events, so features appear within seconds; without
    it, it runs the spec at --spec (./featureplane.yaml unless told otherwise).

    Kafka with TLS or a sign-in (Amazon MSK: SSL, SASL/SCRAM, IAM): set
    FEATUREPLANE_KAFKA_CONFIG to a JSON object of librdkafka properties (environment
    only, never a flag: it holds passwords; logs show the property names only).
    """
    from featureplane.cli.up import UpSettings, run

    settings, up_settings = model_from(Settings, args), model_from(UpSettings, args)
    return run(settings, up_settings, args.rate if args.demo else None)


def serve(args: argparse.Namespace) -> int:
    """Run the HTTP feature server.

    Reads go through each group's `tiers`, top first: an in-process LRU bounded by
    bytes (`--local-cache-mb`), Redis (`FEATUREPLANE_REDIS_URL`; unset = no Redis
    tier), then the durable store (`FEATUREPLANE_STORE`). Values past a group's
    soft TTL are served and refreshed in the background; past its hard TTL never
    served. Ids the store lacks are remembered for `--negative-ttl`. A tier that
    fails or times out is skipped by its circuit breaker for a while; with Redis
    down the store answers, with the store down cached values within hard TTL are
    served and the rest get 503.

    Security: set FEATUREPLANE_TOKEN to require `Authorization: Bearer <token>`
    on /v1/* (environment only, never a flag, so it stays out of `ps`).
    Every FEATUREPLANE_SERVE_* variable below is the flag's default.

    Hostile clients: a connection must send each request head within
    `--header-timeout` (also the idle keep-alive time) and its body within
    `--body-timeout`, or it is disconnected (408 for a late body); beyond
    `--max-connections` open ones, new connections get a 503 and are closed.
    These events are counted in /metrics and summarised in the log at most once a
    minute per kind, never one line each.

    SIGTERM: /readyz turns 503 while requests are still served for
    `--drain-delay` (so load balancers stop sending), then the server stops
    accepting, finishes in-flight requests (`--shutdown-timeout`) and closes
    every client. Ctrl-C (SIGINT) does the same without the drain delay.

    Cores: `--workers N` runs N server processes on the one port (SO_REUSEPORT; the
    kernel spreads connections over them), each with its own in-process tier and
    clients, under a supervisor that forwards SIGTERM and Ctrl-C to all, restarts a
    worker that dies (with backoff; more than 5 restarts a minute stops the server,
    exit 1) and exits 0 once all drained. Unset, N is the cores this process may use:
    its CPU affinity, lowered to its cgroup CPU quota (a container limited to 2 CPUs
    runs 2); `--workers 1` is one process, no supervisor. /metrics on the port answers
    for all workers: counts summed (another worker's at most 1 s late), connections
    summed, breaker states the worst of any worker.
    """
    settings, config = model_from(Settings, args), model_from(ServeConfig, args)
    catalog = load_catalog(settings.spec)
    from featureplane.serving import main

    return main.run(settings, catalog, config, _catalog_parts(settings, catalog))


def _catalog_parts(settings: Settings, catalog: Catalog) -> CatalogParts:
    """What the catalog (/ui) reads beyond serving: this machine's batch runs, and with a
    Kafka bootstrap, the newest records of the dead-letter topics."""
    from featureplane.batch.dlq import newest
    from featureplane.batch.runs import last_runs
    from featureplane.operators.kafka_cluster import KafkaCluster
    from featureplane.serving.catalog import CatalogParts

    jobs = tuple(catalog.jobs)
    dead_letters = None
    if settings.kafka_bootstrap:
        kafka = KafkaCluster(settings.kafka_bootstrap, settings.kafka_config)
        dead_letters = functools.partial(newest, kafka)
    return CatalogParts(
        batch_runs=functools.partial(last_runs, settings, jobs), dead_letters=dead_letters
    )


def ingest(args: argparse.Namespace) -> int:
    """Run the stream ingestion dataflow.

    It reads the event topics that the spec's ingestion rules name, from the
    consumer group's committed offsets, and writes every feature group they feed.
    Each record is decoded and validated, dispatched to every rule it matches
    (event_type and `where`), turned into items by the rule's group, and
    written to the store (and, for `write: through` groups, the Redis tier)
    batch by batch with concurrent I/O. Offsets are committed only when a
    record's items are written, or the record is confirmed delivered to
    <topic>.dlq (malformed: bad JSON, missing field, wrong type, over 8 KiB;
    a copy larger than the broker's max.message.bytes is cut, with headers
    truncated=true and original_size) or <topic>.retry (transient store
    failure, or tiers=redis when only the Redis write failed; see `featureplane
    retry`). A record a step fails on affects only itself, never its batch. The
    retry and DLQ topics (and missing event topics) are created at start.
    SIGTERM stops reading, finishes writes in flight, commits and exits 0 (a
    SIGTERM during start-up too). A broker that does not answer, or a metrics
    port that is taken, stops the start with one line saying what to change.
    Metrics are served on FEATUREPLANE_METRICS_PORT [9100; retry's is 9101]
    (0 picks a free port). Scale out by starting more processes in the same
    FEATUREPLANE_KAFKA_GROUP: they share the topics' partitions, and a process
    that dies has its partitions moved to the others after the session timeout.

    Cluster mode: python -m bytewax.run "featureplane.flows.ingest:flow()" -w WORKERS
    [-i ID -a ADDRS] builds the same dataflow from the same FEATUREPLANE_* variables.

    Kafka with TLS or a sign-in (Amazon MSK: SSL, SASL/SCRAM, IAM): set
    FEATUREPLANE_KAFKA_CONFIG to a JSON object of librdkafka properties (environment
    only, never a flag: it holds passwords; logs show the property names only).
    """
    settings, options = model_from(Settings, args), model_from(FlowOptions, args)
    catalog = load_catalog(settings.spec)
    from featureplane.flows.ingest import run

    return run(settings, catalog, options)


def retry(args: argparse.Namespace) -> int:
    """Run the retry-topic dataflow.

    It reprocesses records that failed for a transient reason. It reads
    <topic>.retry for every event topic of the spec (its own consumer group,
    --retry-group). A record with header attempt=n waits a random backoff of up
    to min(cap, base * 2**(n-1)) from when it was handed over, without holding
    back other records, then goes through the same decode, dispatch, aggregate
    and write steps as in `featureplane ingest` (a record with header
    tiers=redis, whose store write had succeeded, rewrites the Redis tier only).
    If it fails again it goes back to <topic>.retry as attempt n+1 until
    --retry-budget has passed since its first failure, then to <topic>.dlq with
    the reason; a Redis-only record is never dead-lettered: its cache write is
    abandoned, logged and counted in featureplane_ingest_cache_abandoned.
    Offsets are committed only once a record is written or handed over with
    delivery confirmed. SIGTERM stops gracefully. Metrics are served on
    FEATUREPLANE_METRICS_PORT [9101, so that ingest's 9100 and retry's do not
    collide on one host].

    Cluster mode: python -m bytewax.run "featureplane.flows.retry:flow()" builds the
    same dataflow from the same FEATUREPLANE_* variables.

    Kafka with TLS or a sign-in (Amazon MSK: SSL, SASL/SCRAM, IAM): set
    FEATUREPLANE_KAFKA_CONFIG to a JSON object of librdkafka properties (environment
    only, never a flag: it holds passwords; logs show the property names only).
    """
    settings, options = model_from(Settings, args), model_from(FlowOptions, args)
    catalog = load_catalog(settings.spec)
    from featureplane.flows.retry import run

    return run(settings, catalog, options)


def backfill(args: argparse.Namespace) -> int:
    """Reprocess a Kafka topic's time range into the store.

    Reads every partition of --topic from the first offset at --from (Kafka's
    offsets-for-times lookup) to the end of the log, keeps the records whose
    Kafka timestamp is within [--from, --to], and passes them through the same
    decode, dispatch and aggregate steps as `featureplane ingest`, optionally only
    for --groups. A partition stops at the end of its log, or at its first record
    stamped more than --grace after --to (records are in timestamp order within a
    partition, up to producers' clock skew). It joins no consumer group and
    commits nothing: the live ingest is untouched. Writes are idempotent, so a
    backfill over data already ingested changes nothing, and one stopped midway
    can simply run again.

    Malformed records are counted and listed, not sent to the DLQ again (the live
    ingest did that). Transient store failures are retried with backoff; after
    --max-attempts the job stops with the reason and exit status 1. A broker that
    does not answer, or fails a call, stops the job with one line naming it.

    TIME is epoch milliseconds, ISO 8601 with a timezone (2026-11-01T00:00:00Z),
    `now`, or a duration before --at (`-7d`).

    --shard I/N does one shard: the partitions and time slices of the range split
    in N parts, the same on every machine for the same --at (`batch run` and the
    manifests of `batch render` run every I). Without it the whole range is read.

    Kafka with TLS or a sign-in (Amazon MSK: SSL, SASL/SCRAM, IAM): set
    FEATUREPLANE_KAFKA_CONFIG to a JSON object of librdkafka properties (environment
    only, never a flag: it holds passwords; logs show the property names only).
    """
    settings = model_from(Settings, args)
    catalog = load_catalog(settings.spec)
    from featureplane.batch.backfill import BackfillJob, run

    at = args.at if args.at is not None else now_ms()
    job = BackfillJob(
        topic=args.topic,
        start=resolve_time(args.start, at),
        end=resolve_time(args.end, at),
        groups=args.groups,
        batch_size=args.batch_size,
        grace_ms=args.grace,
        max_attempts=args.max_attempts,
        shard=args.shard,
    )
    return run(settings, catalog, job)


def load(args: argparse.Namespace) -> int:
    """Load a JSONL or Parquet file into a feature group.

    SOURCE is a local path or s3://bucket/key, and may be a glob (`*`, `?`,
    `[...]`) matching several files; `{date}` in it is the UTC day of --at
    (YYYY-MM-DD). No file matching is an error. --shard I/N loads one shard:
    the files, Parquet row groups and JSONL byte ranges split in N parts of
    about equal size, the same on every machine. Each row is one item: `id`
    (string, or an integer taken as its decimal string), `ts` (event time, epoch
    ms) and the features, either as an object `features: {name: value}` or as
    columns named like the features. `event_id` is optional: without it a row's
    id is derived from its content, so loading the same file again overwrites
    instead of duplicating. A row that does not fit the group (bad JSON, missing
    id or ts, unknown feature, wrong type, over 8 KiB) is rejected with its line
    (or row) number and reason, printed and, with --rejects, written as JSONL;
    the rest loads. The exit status is 1 when any row was rejected.

    Items go to the store and, for `write: through` groups, to the Redis tier
    (which also forgets any cached "missing" for the ids loaded).
    s3:// sources use the standard AWS variables (AWS_REGION, credentials,
    AWS_ENDPOINT_URL_S3 for an S3-compatible endpoint). Parquet needs pyarrow
    (`pip install 'featureplane[parquet]'`).
    """
    settings = model_from(Settings, args)
    catalog = load_catalog(settings.spec)
    from featureplane.batch.load import LoadJob, run

    at = args.at if args.at is not None else now_ms()
    source = resolve_source(args.source, at)
    job = LoadJob(source, args.group, args.format, args.batch_size, args.rejects, args.shard)
    return run(settings, catalog, job)


def validate(args: argparse.Namespace) -> int:
    """Check spec files and print every problem.

    PATH is one YAML file or a folder of them. Each problem is one line,
    `file:line: field: message`, all of them in one pass: every group and rule
    is checked, and checked against the others, even when some fail, and a
    misspelled key gets the field it most likely meant. Exit status 0 when the
    catalog is valid, 1 otherwise (also when PATH holds no spec).
    """
    from featureplane.cli.validate import run

    return run(args.path)


def redrive(args: argparse.Namespace) -> int:
    """Send dead-lettered records back through ingestion, after a fix.

    Reads TOPIC.dlq from its start to its end when the command starts, and passes
    each record (or those matching --reason and --from/--to) through the same
    decode, dispatch, aggregate and write steps as `featureplane ingest`, with
    the catalog as it is now. Prints how many were re-ingested and how many
    failed again; a record that fails again goes back to TOPIC.dlq with its new
    reason. Running it twice duplicates nothing: items are written by event id,
    so a record re-ingested again overwrites itself, and a record that already
    failed under this same catalog is not tried (and dead-lettered) again.
    Transient store failures are retried with backoff; if they persist the
    command stops with status 1, and running it again is safe.

    Exit status 0 when the run finished, even if some records failed again
    (they are back in TOPIC.dlq, so a scheduled redrive does not fail over
    them); 1 when it stopped early (unknown topic, Kafka unreachable, the store
    failing past its retries, the DLQ not confirming a record sent back). Run
    one redrive of a DLQ at a time.

    Kafka with TLS or a sign-in (Amazon MSK: SSL, SASL/SCRAM, IAM): set
    FEATUREPLANE_KAFKA_CONFIG to a JSON object of librdkafka properties (environment
    only, never a flag: it holds passwords; logs show the property names only).
    """
    settings = model_from(Settings, args)
    catalog = load_catalog(settings.spec)
    from featureplane.batch.redrive import RedriveJob, run

    job = RedriveJob(args.topic, args.reason, args.start, args.end, args.dry_run)
    return run(settings, catalog, job)


def batch(args: argparse.Namespace) -> int:
    """Plan, run, follow and deploy the batch jobs of the spec (`batch_jobs:`).

    A job is a file load or a topic backfill, with an optional cron schedule
    (UTC), `after:` jobs it depends on, `parallelism` (a number, or auto: from
    the input's size and measured speed) and a `timeout`. Each job splits into
    shards that run in parallel; `featureplane load` and `backfill` with
    --shard I/N run one shard each, so any engine can run them.

      featureplane batch plan      the DAG, each job's shards and why that many
      featureplane batch run       run jobs on this machine, resumable
      featureplane batch status    recent runs
      featureplane batch render    manifests for Argo Workflows or Kubernetes Jobs
      featureplane batch report    push the end of a job's run by an engine
    """
    return int(args.batch_run(args))


def batch_plan(args: argparse.Namespace) -> int:
    """Show the batch DAG, each job's shards and why that many.

    For each job (the ones named and what they depend on, else all) it lists
    the input found now: files and their sizes, Parquet row groups, or a
    topic's partitions and records in the time range, the shards, the time
    they should take at the per-shard speed measured by earlier runs on this
    machine (or a default, said so), and the reason for the count: a fixed
    `parallelism`, or auto's target (--batch-target-duration) and cap
    (--batch-max-shards). Nothing is written.
    """
    settings = model_from(Settings, args)
    catalog = load_catalog(settings.spec)
    from featureplane.batch.plan import run

    return run(settings, catalog, args.jobs, args.at, as_json=args.json, shard_list=args.shard_list)


def batch_run(args: argparse.Namespace) -> int:
    """Run batch jobs, and the jobs they depend on, on this machine.

    Jobs run in DAG order (a job starts when every job in its `after` has
    succeeded in this run); each job's shards run in parallel, at most
    --workers at once, each in its own process, with one progress line per job
    (rows or records, rate, ETA; plain lines when stderr is not a terminal).
    The run and each shard's outcome are recorded in --data-dir, so running the
    same command again after a crash, Ctrl-C or a failed shard resumes that run
    (same --at) and does only the shards not done; --new starts afresh. A shard
    past its job's `timeout` is stopped and the run fails. Exit status 0 when
    every job succeeded, else 1 with the failed shards and their log files.
    Metrics (state, shards done, rows, rejects, last success) are written to
    --data-dir/batch/metrics.prom and pushed to --pushgateway-url when set.
    """
    settings = model_from(Settings, args)
    catalog = load_catalog(settings.spec)
    from featureplane.batch.runner import run

    return run(settings, catalog, args.jobs, args.at, workers=args.workers, new=args.new)


def batch_status(args: argparse.Namespace) -> int:
    """List recent batch runs on this machine.

    Newest first: each run's jobs, state (running, succeeded, failed,
    interrupted), shards done of total, rows written and rejected, start and
    duration, and for a failure the shard, its reason and its log file.
    """
    settings = model_from(Settings, args)
    from featureplane.batch.status import status

    return status(settings, limit=args.limit, as_json=args.json)


def batch_render(args: argparse.Namespace) -> int:
    """Write manifests that run the spec's scheduled batch jobs on Kubernetes.

    --engine argo: Argo Workflows. One CronWorkflow per schedule, a DAG with a
    task per job (`after` as dependencies), each job planned at run time
    (`batch plan --shard-list`) and fanned out to one pod per shard running
    `featureplane load|backfill --shard I/N --at <scheduled time>`, with
    retries, `activeDeadlineSeconds` from `timeout`, and Prometheus metrics.
    Jobs without a schedule get a WorkflowTemplate to submit by hand.

    --engine k8s: a CronJob per scheduled job, each an Indexed Job
    (`completionMode: Indexed`, the pod's index its shard); only for jobs
    without dependencies, since Kubernetes Jobs cannot order jobs.
    `parallelism: auto` is planned from the input found at render time.
    """
    settings = model_from(Settings, args)
    catalog = load_catalog(settings.spec)
    from featureplane.batch.render import run

    return run(
        settings,
        catalog,
        engine=args.engine,
        output=args.output,
        image=args.image,
        namespace=args.namespace,
    )


def batch_report(args: argparse.Namespace) -> int:
    """Push the end of a batch job's run by a workflow engine to the Pushgateway.

    It is what the manifests of `batch render --engine argo` run when a job
    ends, so that a job run by an engine has the same metrics as one run by
    `batch run`: featureplane_batch_run_state (running, succeeded or failed),
    shards done, rows written and rejects summed from what the job's shards
    pushed since --at, and on success the last success time. The run's start,
    timeout, shards and next scheduled run were pushed by its plan step
    (`batch plan --shard-list JOB`). --state takes Argo's task phases as well.
    Without --pushgateway-url nothing is pushed; a Pushgateway that does not
    answer is a warning. Exit status 0 for succeeded, 1 for failed, so that the
    step that reports a failure fails too.
    """
    settings = model_from(Settings, args)
    catalog = load_catalog(settings.spec)
    from featureplane.batch.metrics import report
    from featureplane.jobs import job_named

    return report(settings, job_named(catalog.jobs, args.job), args.at, args.state)


def demo_events(args: argparse.Namespace) -> int:
    """Feed sample events for the example catalog into Kafka.

    Clicks and searches on `user-actions`, keyword changes on `user-updates`,
    article updates with 64-float embeddings and stats on `article-updates`.
    User `user-1` is the busiest, so its features visibly grow within seconds:

        curl -s localhost:8000/v1/features/recent_user_clicked_fleaMarketArticles/user-1

    Kafka with TLS or a sign-in (Amazon MSK: SSL, SASL/SCRAM, IAM): set
    FEATUREPLANE_KAFKA_CONFIG to a JSON object of librdkafka properties (environment
    only, never a flag: it holds passwords; logs show the property names only).
    """
    settings = model_from(Settings, args)
    from featureplane.cli.demo import run

    return run(settings, rate=args.rate, count=args.count, users=args.users, seed=args.seed)

"""The `featureplane` argument parser: every command with its description and flags.

Settings flags come from the settings models (`flags.add_flags`); the few
arguments that are a command's input rather than configuration (a file to
load, a topic and time range to backfill, `--demo`) are declared here, with
their defaults shown by argparse. The flag names are part of the public
command line: `tests/unit/test_cli.py` pins every one.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

from featureplane.cli import commands
from featureplane.cli.flags import add_flags
from featureplane.flows.options import METRICS_PORTS, RETRY_FIELDS, FlowOptions
from featureplane.jobs import cron_latest, resolve_time
from featureplane.serving.config import ServeConfig
from featureplane.settings import Settings, to_ms

__all__ = ["COMMANDS", "build_parser", "parse_shard", "parse_time", "settings_models"]

Command = Callable[[argparse.Namespace], int]

KAFKA = ("kafka_bootstrap", "kafka_group")
STORE = (
    "store",
    "data_dir",
    "dynamodb_table",
    "dynamodb_endpoint",
    "redis_url",
    "redis_cluster",
)
HTTP = ("host", "port")
METRICS = ("metrics_port", "metrics_host")
FLOW = tuple(f for f in FlowOptions.model_fields if f not in RETRY_FIELDS)
DURATIONS = "A DURATION is milliseconds (1000) or a number with a unit: 500ms, 30s, 5m, 2h, 30d."


def settings_models() -> tuple[type[BaseSettings], ...]:
    """Every model that reads FEATUREPLANE_* variables (to tell a typo from a setting)."""
    from featureplane.cli.up import UpSettings

    return (Settings, FlowOptions, ServeConfig, UpSettings)


def parse_time(text: str) -> int:
    """`now`, `-7d` (before now), epoch milliseconds or ISO 8601 with a zone -> epoch ms;
    `schedule:CRON`: the cron line's latest fire time at or before now (what a Kubernetes
    CronJob's pods pass as --at, since Kubernetes tells them no scheduled time)."""
    now = int(time.time() * 1000)
    try:
        if text.startswith("schedule:"):
            return cron_latest(text.removeprefix("schedule:"), now)
        return resolve_time(text, now)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _time_expr(text: str) -> str:
    """A time as given, checked: a relative one counts from the run's --at, known later."""
    try:
        resolve_time(text, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N), 0 <= I < N."""
    i, _, n = text.partition("/")
    if i.isdigit() and n.isdigit() and 0 <= int(i) < int(n) <= 10_000:
        return int(i), int(n)
    raise argparse.ArgumentTypeError(f"bad shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")


def _duration(text: str) -> int:
    try:
        return int(str(to_ms(text)))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _store(p: argparse.ArgumentParser) -> None:
    add_flags(p.add_argument_group("store"), Settings, STORE)


def _up(p: argparse.ArgumentParser) -> None:
    add_flags(p, Settings, ("spec", "data_dir", *HTTP))
    add_flags(p.add_argument_group("kafka"), Settings, ("kafka_bootstrap",))
    g = p.add_argument_group("demo")
    g.add_argument(
        "--demo", action="store_true", help="use the example catalog and feed sample events"
    )
    g.add_argument("--rate", type=float, default=50.0, help="demo events per second [%(default)s]")


def _serve(p: argparse.ArgumentParser) -> None:
    add_flags(p, Settings, ("spec",))
    _store(p)
    add_flags(p.add_argument_group("http"), Settings, HTTP)
    add_flags(
        p.add_argument_group("cache, tiers and connections"), ServeConfig, ServeConfig.model_fields
    )


def _flow(kind: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        add_flags(p, Settings, ("spec",))
        add_flags(p.add_argument_group("kafka"), Settings, KAFKA)
        _store(p)
        shown = {"metrics_port": METRICS_PORTS[kind]}
        add_flags(p.add_argument_group("metrics"), Settings, METRICS, shown)
        add_flags(p.add_argument_group("dataflow"), FlowOptions, FLOW)
        if kind == "retry":
            add_flags(p.add_argument_group("retry"), FlowOptions, RETRY_FIELDS)

    return add


def _backfill(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topic", required=True, help="the event topic to reprocess")
    p.add_argument(
        "--from",
        dest="start",
        metavar="TIME",
        required=True,
        type=_time_expr,
        help="first event time: epoch ms, ISO 8601 with a zone, or --from=-7d (before --at)",
    )
    p.add_argument(
        "--to",
        dest="end",
        metavar="TIME",
        default="now",
        type=_time_expr,
        help="last event time (inclusive), in the same forms [now: --at]",
    )
    p.add_argument(
        "--groups", help="only these feature groups, comma separated [all fed by the topic]"
    )
    p.add_argument("--batch-size", type=int, default=2000, help="records per batch [%(default)s]")
    p.add_argument(
        "--grace",
        metavar="DURATION",
        type=_duration,
        default="1h",
        help="stop a partition at a record this far past --to [1h]",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=8,
        help="retries of a transient write failure [%(default)s]",
    )
    _shard_flags(p, "relative --from and --to count from it")
    add_flags(p, Settings, ("spec",))
    add_flags(p.add_argument_group("kafka"), Settings, ("kafka_bootstrap",))
    _store(p)


def _shard_flags(p: argparse.ArgumentParser, at_means: str) -> None:
    g = p.add_argument_group("shards (how `batch run` and the rendered manifests split a job)")
    g.add_argument(
        "--shard",
        metavar="I/N",
        type=parse_shard,
        help="do only shard I of N (0 <= I < N): every I over one N does the whole job once",
    )
    g.add_argument(
        "--at",
        metavar="TIME",
        type=parse_time,
        help=f"the run's time, so that every shard reads the same input; {at_means} [now]",
    )


def _load(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        help="JSONL or Parquet files: a local path or s3://bucket/key, a glob (*, ?, [...]); "
        "{date} is the UTC day of --at",
    )
    p.add_argument("--group", required=True, help="the feature group to load into")
    p.add_argument(
        "--format",
        choices=["jsonl", "parquet"],
        help="file format [by extension: .parquet, else jsonl]",
    )
    p.add_argument("--batch-size", type=int, default=1000, help="items per write [%(default)s]")
    p.add_argument(
        "--rejects", type=Path, help="also write rejected rows, with reasons, to this JSONL file"
    )
    _shard_flags(p, "{date} in SOURCE is its UTC day")
    add_flags(p, Settings, ("spec",))
    _store(p)


def _validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a spec YAML file or a folder of them")


def _demo_events(p: argparse.ArgumentParser) -> None:
    add_flags(p.add_argument_group("kafka"), Settings, ("kafka_bootstrap",))
    p.add_argument("--rate", type=float, default=50.0, help="events per second [%(default)s]")
    p.add_argument(
        "--count", type=int, default=0, help="stop after this many events [%(default)s = never]"
    )
    p.add_argument("--users", type=int, default=100, help="distinct user ids [%(default)s]")
    p.add_argument("--seed", type=int, help="random seed, for repeatable streams")


def _batch_common(p: argparse.ArgumentParser) -> None:
    add_flags(p, Settings, ("spec",))
    add_flags(p.add_argument_group("kafka"), Settings, ("kafka_bootstrap",))
    _store(p)
    add_flags(
        p.add_argument_group("batch"),
        Settings,
        ("batch_target_duration", "batch_max_shards", "pushgateway_url"),
    )


def _batch_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("jobs", nargs="*", metavar="JOB", help="these jobs and their dependencies [all]")
    p.add_argument("--at", metavar="TIME", type=parse_time, help="the run's time [now]")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--shard-list",
        metavar="JOB",
        help="print only JOB's shards as a JSON list of I/N (what an Argo task fans out over)",
    )
    _batch_common(p)


def _batch_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("jobs", nargs="*", metavar="JOB", help="these jobs and their dependencies [all]")
    p.add_argument(
        "--at",
        metavar="TIME",
        type=parse_time,
        help="the run's time: {date} is its UTC day, relative backfill times count from it "
        "[now; a resumed run keeps its own]",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="shards run at once, each in its own process [cores: %(default)s]",
    )
    p.add_argument(
        "--new",
        action="store_true",
        help="start a new run even if the last run of these jobs did not finish",
    )
    _batch_common(p)


def _batch_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=20, help="runs shown, newest first [%(default)s]")
    p.add_argument("--json", action="store_true", help="print the runs as JSON")
    add_flags(p, Settings, ("data_dir",))


def _batch_render(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=["argo", "k8s"],
        required=True,
        help="argo: Argo Workflows (CronWorkflows, DAGs, fan-out); k8s: CronJobs of Indexed "
        "Jobs (jobs without dependencies only)",
    )
    p.add_argument("--output", "-o", type=Path, help="write the manifests here [stdout]")
    p.add_argument(
        "--image",
        default="ghcr.io/featureplane/featureplane:0.1.0",
        help="the container image the jobs run [%(default)s]",
    )
    p.add_argument(
        "--namespace", default="featureplane", help="namespace of the manifests [%(default)s]"
    )
    add_flags(p, Settings, ("spec",))
    add_flags(
        p.add_argument_group("batch"), Settings, ("batch_target_duration", "batch_max_shards")
    )


_STATES = {"succeeded": "succeeded", "failed": "failed", "error": "failed", "omitted": "failed"}


def _state(text: str) -> str:
    """succeeded or failed; Argo's task phases too (Succeeded; Failed, Error, Omitted)."""
    try:
        return _STATES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"bad state {text!r}: expected succeeded or failed (or Argo's Succeeded, Failed, "
            "Error, Omitted)"
        ) from None


def _batch_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB", help="the batch job whose run ended")
    p.add_argument("--at", metavar="TIME", type=parse_time, required=True, help="the run's time")
    p.add_argument(
        "--state",
        type=_state,
        required=True,
        help="succeeded or failed; Argo's task phases too (Succeeded; Failed, Error and "
        "Omitted are failed)",
    )
    add_flags(p, Settings, ("spec",))
    add_flags(p.add_argument_group("batch"), Settings, ("pushgateway_url",))


BATCH: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None]]] = {
    "plan": (commands.batch_plan, _batch_plan),
    "run": (commands.batch_run, _batch_run),
    "status": (commands.batch_status, _batch_status),
    "render": (commands.batch_render, _batch_render),
    "report": (commands.batch_report, _batch_report),
}
"""`featureplane batch` sub-commands, as COMMANDS."""


def _batch(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="batch_command", metavar="SUBCOMMAND", required=True)
    _add_commands(sub, BATCH, "batch_run")


def _redrive(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "topic", metavar="TOPIC.dlq", help="the dead-letter topic, e.g. user-actions.dlq"
    )
    p.add_argument("--reason", help="only records whose reason contains this text")
    p.add_argument(
        "--from",
        dest="start",
        metavar="TIME",
        type=parse_time,
        help="only records dead-lettered "
        "at or after TIME: epoch ms, ISO 8601 with a zone, or -1d (before now)",
    )
    p.add_argument(
        "--to",
        dest="end",
        metavar="TIME",
        type=parse_time,
        help="only records dead-lettered at or before TIME",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="count what would be re-ingested, write nothing"
    )
    add_flags(p, Settings, ("spec",))
    add_flags(p.add_argument_group("kafka"), Settings, ("kafka_bootstrap",))
    _store(p)


COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None]]] = {
    "up": (commands.up, _up),
    "serve": (commands.serve, _serve),
    "ingest": (commands.ingest, _flow("ingest")),
    "retry": (commands.retry, _flow("retry")),
    "backfill": (commands.backfill, _backfill),
    "load": (commands.load, _load),
    "validate": (commands.validate, _validate),
    "redrive": (commands.redrive, _redrive),
    "batch": (commands.batch, _batch),
    "demo-events": (commands.demo_events, _demo_events),
}
"""Each command: what runs it (its docstring the help) and what adds its arguments."""

_HAS_DURATIONS = frozenset({"serve", "ingest", "retry", "backfill", "plan", "run", "render"})


class _Version(argparse.Action):
    """`--version`: the installed distribution's version, looked up only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        try:
            version = metadata.version("featureplane")
        except metadata.PackageNotFoundError:  # run from a source tree that is not installed
            version = "(not installed)"
        print(f"featureplane {version}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; `args.run(args)` runs the one given."""
    parser = argparse.ArgumentParser(
        prog="featureplane",
        description="Real-time feature platform for recommender systems: ingest events from "
        "Kafka into feature groups and serve them over HTTP in milliseconds.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_commands(sub, COMMANDS, "run")
    return parser


def _add_commands(
    sub: Any,
    commands_: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None]]],
    dest: str,
) -> None:
    for name, (run, add_arguments) in commands_.items():
        doc = inspect.getdoc(run) or name
        p = sub.add_parser(
            name,
            help=_summary(doc),
            description=doc,
            epilog=DURATIONS if name in _HAS_DURATIONS else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(p)
        p.set_defaults(**{dest: run})


def _summary(doc: str) -> str:
    """A docstring's first line as `--help` lists commands: 'Run the X.' -> 'run the X'."""
    first = doc.splitlines()[0].rstrip(".")
    return first[:1].lower() + first[1:]

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
from collections.abc import Callable
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

from featureplane.cli import commands
from featureplane.cli.flags import add_flags
from featureplane.flows.options import METRICS_PORTS, RETRY_FIELDS, FlowOptions
from featureplane.serving.config import ServeConfig
from featureplane.settings import Settings, to_ms

__all__ = ["COMMANDS", "build_parser", "parse_time", "settings_models"]

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
    """Epoch milliseconds, or ISO 8601 with a timezone -> epoch milliseconds."""
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad time {text!r}: use epoch milliseconds or ISO 8601, e.g. 2026-11-01T00:00:00Z"
        ) from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"time {text!r} has no timezone: add Z or +09:00")
    return int(when.timestamp() * 1000)


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
        type=parse_time,
        help="first event time, epoch ms or ISO 8601 with timezone",
    )
    p.add_argument(
        "--to",
        dest="end",
        metavar="TIME",
        required=True,
        type=parse_time,
        help="last event time (inclusive), epoch ms or ISO 8601 with timezone",
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
    add_flags(p, Settings, ("spec",))
    add_flags(p.add_argument_group("kafka"), Settings, ("kafka_bootstrap",))
    _store(p)


def _load(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="JSONL or Parquet file: a local path or s3://bucket/key")
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


COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None]]] = {
    "up": (commands.up, _up),
    "serve": (commands.serve, _serve),
    "ingest": (commands.ingest, _flow("ingest")),
    "retry": (commands.retry, _flow("retry")),
    "backfill": (commands.backfill, _backfill),
    "load": (commands.load, _load),
    "validate": (commands.validate, _validate),
    "demo-events": (commands.demo_events, _demo_events),
}
"""Each command: what runs it (its docstring the help) and what adds its arguments."""

_HAS_DURATIONS = frozenset({"serve", "ingest", "retry", "backfill"})


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
    for name, (run, add_arguments) in COMMANDS.items():
        doc = inspect.getdoc(run) or name
        p = sub.add_parser(
            name,
            help=_summary(doc),
            description=doc,
            epilog=DURATIONS if name in _HAS_DURATIONS else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def _summary(doc: str) -> str:
    """A docstring's first line as `--help` lists commands: 'Run the X.' -> 'run the X'."""
    first = doc.splitlines()[0].rstrip(".")
    return first[:1].lower() + first[1:]

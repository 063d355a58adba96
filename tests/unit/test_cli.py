"""The command line: every flag of every command, settings from flags and variables (a flag
wins), one Duration everywhere, errors naming the flag or variable, --version, and the
import graph behind it (`validate` loads nothing heavy; the parts import no CLI)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from bytewax.dataflow import Dataflow
from bytewax.run import _locate_dataflow, _prepare_import  # what `python -m bytewax.run` uses
from pydantic_settings import BaseSettings

from featureplane.cli import main
from featureplane.cli.flags import BadSettingError, add_flags, model_from, unknown_variables
from featureplane.cli.parser import COMMANDS, build_parser, parse_time, settings_models
from featureplane.cli.up import UpSettings
from featureplane.flows.options import FlowOptions
from featureplane.serving.config import ServeConfig
from featureplane.settings import Settings, format_duration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

STORE = {
    "--store",
    "--data-dir",
    "--dynamodb-table",
    "--dynamodb-endpoint",
    "--redis-url",
    "--redis-cluster",
}
FLOW = {
    "--spec",
    "--bootstrap",
    "--group",
    *STORE,
    "--metrics-port",
    "--metrics-host",
    "--workers",
    "--batch-size",
    "--chunk-items",
    "--commit-interval",
    "--write-timeout",
    "--drain-timeout",
    "--session-timeout",
    "--topic-partitions",
}
FLAGS = {
    "up": {"--spec", "--bootstrap", "--data-dir", "--host", "--port", "--demo", "--rate"},
    "serve": {
        "--spec",
        *STORE,
        "--host",
        "--port",
        "--local-cache-mb",
        "--invalidation",
        "--local-soft-ttl",
        "--negative-ttl",
        "--redis-timeout",
        "--store-timeout",
        "--breaker-failures",
        "--breaker-cooldown",
        "--xfetch-beta",
        "--shutdown-timeout",
        "--drain-delay",
        "--header-timeout",
        "--body-timeout",
        "--max-connections",
        "--uvloop",
        "--workers",
        "--catalog-metrics",
        "--catalog-prometheus",
    },
    "ingest": FLOW,
    "retry": FLOW | {"--retry-budget", "--backoff-base", "--backoff-cap", "--retry-group"},
    "backfill": {
        "--topic",
        "--from",
        "--to",
        "--groups",
        "--batch-size",
        "--grace",
        "--max-attempts",
        "--shard",
        "--at",
        "--spec",
        "--bootstrap",
        *STORE,
    },
    "load": {
        "--group",
        "--format",
        "--batch-size",
        "--rejects",
        "--shard",
        "--at",
        "--spec",
        *STORE,
    },
    "validate": set(),
    "redrive": {"--reason", "--from", "--to", "--dry-run", "--spec", "--bootstrap", *STORE},
    "batch": set(),
    "demo-events": {"--bootstrap", "--rate", "--count", "--users", "--seed"},
}
"""Every flag of every command as the command line had them when this test was written."""
BATCH_COMMON = {
    "--spec",
    "--bootstrap",
    *STORE,
    "--batch-target-duration",
    "--batch-max-shards",
    "--pushgateway-url",
}
BATCH_FLAGS = {
    "plan": {"--at", "--json", "--shard-list", *BATCH_COMMON},
    "run": {"--at", "--workers", "--new", *BATCH_COMMON},
    "status": {"--limit", "--json", "--data-dir"},
    "render": {
        "--engine",
        "--output",
        "--image",
        "--namespace",
        "--spec",
        "--batch-target-duration",
        "--batch-max-shards",
    },
    "report": {"--at", "--state", "--spec", "--pushgateway-url"},
}


@pytest.fixture(autouse=True)
def no_featureplane_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("FEATUREPLANE_")]:
        monkeypatch.delenv(name)


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------- the flags


def test_every_command_keeps_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(COMMANDS) == set(FLAGS)
    for command, flags in FLAGS.items():
        shown = set(re.findall(r"^  (--[a-z-]+)", _help([command], capsys), re.MULTILINE))
        assert shown == flags, command
    for command, flags in BATCH_FLAGS.items():
        help_text = _help(["batch", command], capsys)
        shown = set(re.findall(r"^  (?:-\w, )?(--[a-z-]+)", help_text, re.MULTILINE)) - {"--help"}
        assert shown == flags, command


def test_flags_set_the_settings_they_name() -> None:
    parse = build_parser().parse_args
    args = parse(
        "retry --spec s.yaml --bootstrap b:1 --group g --store dynamodb --data-dir d "
        "--dynamodb-table t --dynamodb-endpoint http://e --redis-url redis://r --redis-cluster "
        "--metrics-port 0 --metrics-host h --workers 2 --batch-size 3 --chunk-items 4 "
        "--commit-interval 5s --write-timeout 6 --drain-timeout 7m --session-timeout 8s "
        "--topic-partitions 9 --retry-budget 2h --backoff-base 10ms --backoff-cap 1m "
        "--retry-group rg".split()
    )
    s, o = model_from(Settings, args), model_from(FlowOptions, args)
    assert (s.spec, s.kafka_bootstrap, s.kafka_group, s.store) == (
        Path("s.yaml"),
        "b:1",
        "g",
        "dynamodb",
    )
    assert (s.data_dir, s.dynamodb_table, s.dynamodb_endpoint) == (Path("d"), "t", "http://e")
    assert s.redis_url is not None and s.redis_url.get_secret_value() == "redis://r"
    assert s.redis_cluster is True
    assert (s.metrics_port, s.metrics_host) == (0, "h")
    assert (o.workers, o.batch_size, o.chunk_items, o.topic_partitions) == (2, 3, 4, 9)
    assert (o.commit_interval, o.write_timeout, o.drain_timeout, o.session_timeout) == (
        5000,
        6,
        420_000,
        8000,
    )
    assert (o.retry_budget, o.backoff_base, o.backoff_cap, o.retry_group) == (
        7_200_000,
        10,
        60_000,
        "rg",
    )

    args = parse(
        "serve --host 0.0.0.0 --port 9 --local-cache-mb 1 --negative-ttl 2s --redis-timeout 3 "
        "--store-timeout 4s --breaker-failures 5 --breaker-cooldown 6s --xfetch-beta 0.5 "
        "--shutdown-timeout 7 --drain-delay 8 --header-timeout 9 --body-timeout 10 "
        "--max-connections 11 --uvloop".split()
    )
    s, c = model_from(Settings, args), model_from(ServeConfig, args)
    assert (s.host, s.port) == ("0.0.0.0", 9)
    assert c == ServeConfig(
        local_cache_mb=1,
        negative_ttl=2000,
        redis_timeout=3,
        store_timeout=4000,
        breaker_failures=5,
        breaker_cooldown=6000,
        xfetch_beta=0.5,
        shutdown_timeout=7.0,
        drain_delay=8.0,
        header_timeout=9.0,
        body_timeout=10.0,
        max_connections=11,
        uvloop=True,
    )

    args = parse("up --bootstrap b:2 --data-dir u --demo --rate 3".split())
    s = model_from(Settings, args)
    assert (s.kafka_bootstrap, s.data_dir, args.demo, args.rate) == ("b:2", Path("u"), True, 3.0)

    args = parse(
        "backfill --topic t --from 5 --to 2026-11-01T00:00:00Z --groups a,b --batch-size 7 "
        "--grace 2m --max-attempts 3".split()
    )
    assert (args.topic, args.start, args.end, args.groups) == (
        "t",
        "5",
        "2026-11-01T00:00:00Z",
        "a,b",
    )  # resolved against --at by the command
    shard = parse("backfill --topic t --from=-7d --shard 1/4 --at 2026-11-01T00:00:00Z".split())
    assert (shard.start, shard.end, shard.shard, shard.at) == (
        "-7d",
        "now",
        (1, 4),
        1_793_491_200_000,
    )
    with pytest.raises(SystemExit):
        parse("backfill --topic t --from=-7x".split())
    for bad in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(SystemExit):
            parse(f"load --group g f.jsonl --shard {bad}".split())
    assert (args.batch_size, args.grace, args.max_attempts) == (7, 120_000, 3)
    assert parse("backfill --topic t --from 1 --to 2".split()).grace == 3_600_000  # 1h

    args = parse("load f.jsonl --group g --format parquet --rejects r.jsonl".split())
    assert (args.source, args.group, args.format, args.rejects) == (
        "f.jsonl",
        "g",
        "parquet",
        Path("r.jsonl"),
    )
    assert args.batch_size == 1000
    args = parse("demo-events --rate 5 --count 6 --users 7 --seed 8".split())
    assert (args.rate, args.count, args.users, args.seed) == (5.0, 6, 7, 8)


def test_a_switch_has_an_off_flag_that_wins_over_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parse = build_parser().parse_args
    assert model_from(ServeConfig, parse(["serve", "--no-uvloop"])).uvloop is False
    monkeypatch.setenv("FEATUREPLANE_SERVE_UVLOOP", "false")
    assert model_from(ServeConfig, parse(["serve"])).uvloop is False
    assert model_from(ServeConfig, parse(["serve", "--uvloop"])).uvloop is True
    monkeypatch.setenv("FEATUREPLANE_REDIS_CLUSTER", "true")
    assert model_from(Settings, parse(["serve", "--no-redis-cluster"])).redis_cluster is False


def test_help_names_each_variable_and_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    ingest = " ".join(_help(["ingest"], capsys).split())
    assert "[FEATUREPLANE_COMMIT_INTERVAL, 1s]" in ingest
    assert "[FEATUREPLANE_METRICS_PORT, 9100]" in ingest
    assert "[FEATUREPLANE_KAFKA_BOOTSTRAP]" in ingest and "--bootstrap KAFKA_BOOTSTRAP" in ingest
    assert "[FEATUREPLANE_METRICS_PORT, 9101]" in " ".join(_help(["retry"], capsys).split())
    serve = " ".join(_help(["serve"], capsys).split())
    assert "[FEATUREPLANE_SERVE_NEGATIVE_TTL, 5s]" in serve
    assert "[FEATUREPLANE_SERVE_UVLOOP, on]" in serve
    assert "FEATUREPLANE_TOKEN" in serve  # in the description: a variable only
    for command in COMMANDS:
        assert "--token" not in _help([command], capsys)
    with pytest.raises(ValueError, match="FEATUREPLANE_TOKEN only"):
        add_flags(argparse.ArgumentParser(), Settings, ["token"])


def test_every_setting_has_a_description() -> None:
    for model in settings_models():
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"


# ---------------------------------------------------------------- values


def test_a_flag_wins_over_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATUREPLANE_PORT", "8001")
    monkeypatch.setenv("FEATUREPLANE_SERVE_NEGATIVE_TTL", "7s")
    parse = build_parser().parse_args
    assert model_from(Settings, parse(["serve"])).port == 8001
    assert model_from(Settings, parse(["serve", "--port", "8002"])).port == 8002
    assert model_from(ServeConfig, parse(["serve"])).negative_ttl == 7000
    assert model_from(ServeConfig, parse(["serve", "--negative-ttl", "1"])).negative_ttl == 1


@pytest.mark.parametrize(
    ("text", "ms"),
    [("1000", 1000), ("0", 0), ("1s", 1000), ("500ms", 500), ("5m", 300_000), (" 2h ", 7_200_000)],
)
def test_one_duration_for_every_model_flag_and_variable(
    monkeypatch: pytest.MonkeyPatch, text: str, ms: int
) -> None:
    for name in ("COMMIT_INTERVAL", "SERVE_NEGATIVE_TTL", "DRAIN_TIMEOUT"):
        monkeypatch.setenv(f"FEATUREPLANE_{name}", text)
    assert FlowOptions().commit_interval == ms
    assert ServeConfig().negative_ttl == ms
    assert UpSettings().drain_timeout == ms
    assert FlowOptions(commit_interval=ms).commit_interval == ms
    args = build_parser().parse_args(["ingest", "--session-timeout", text.strip()])
    assert model_from(FlowOptions, args).session_timeout == ms


@pytest.mark.parametrize("bad", ["-5", "1w", "5 m", "soon", "", "1.5s"])
def test_a_bad_duration_names_the_variable_or_the_flag(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("FEATUREPLANE_COMMIT_INTERVAL", bad)
    with pytest.raises(BadSettingError, match=r"^FEATUREPLANE_COMMIT_INTERVAL\b"):
        model_from(FlowOptions, build_parser().parse_args(["ingest"]))
    monkeypatch.delenv("FEATUREPLANE_COMMIT_INTERVAL")
    args = build_parser().parse_args(["ingest", "--commit-interval", bad])
    with pytest.raises(BadSettingError, match=r"^--commit-interval\b"):
        model_from(FlowOptions, args)


def test_a_bool_is_not_a_duration() -> None:
    with pytest.raises(ValueError, match="bad duration"):
        FlowOptions(commit_interval=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("model", [Settings, FlowOptions, ServeConfig, UpSettings])
def test_models_are_frozen_and_forbid_unknown_fields(model: type[BaseSettings]) -> None:
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        model(no_such_setting=1)
    first = next(iter(model.model_fields))
    with pytest.raises(ValueError, match="frozen"):
        setattr(model(), first, None)


def test_bad_setting_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--negative-ttl", "soon", "--spec", str(EXAMPLES)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featureplane: bad setting: --negative-ttl: bad duration 'soon'"), err
    assert "\n" not in err


NO_SPEC = [
    ["serve"],
    ["ingest"],
    ["retry"],
    ["load", "--group", "g", "x.jsonl"],
    ["backfill", "--topic", "t", "--from", "0", "--to", "1"],
    ["validate", "featureplane.yaml"],
]


def _says_how_to_get_a_spec(err: str, where: Path) -> None:
    assert err.startswith(
        f"no spec at featureplane.yaml ({where / 'featureplane.yaml'}): no such file or folder."
    ), err
    assert "featureplane up --demo" in err and "--spec" in err and "featureplane validate" in err
    assert ":0:" not in err and "Traceback" not in err


@pytest.mark.parametrize("argv", NO_SPEC, ids=[a[0] for a in NO_SPEC])
def test_a_missing_spec_says_how_to_get_one(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    _says_how_to_get_a_spec(err, tmp_path)


def test_up_without_a_spec_says_how_to_get_one(tmp_path: Path) -> None:
    # In a process of its own: `up` installs signal handlers, and must fail before it starts
    # anything (no broker, no data folder).
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREPLANE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "featureplane.cli", "up"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    _says_how_to_get_a_spec(proc.stderr, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_variable_no_setting_reads_is_named_with_its_likely_meaning() -> None:
    environ = {"FEATUREPLANE_COMIT_INTERVAL": "1s", "FEATUREPLANE_PORT": "1", "HOME": "/"}
    environ |= {"FEATUREPLANE_SERVE_UVLOOP": "1", "FEATUREPLANE_DRAIN_TIMEOUT": "1s"}
    assert unknown_variables(environ, settings_models()) == [
        "FEATUREPLANE_COMIT_INTERVAL is not a featureplane setting and is ignored "
        "(did you mean FEATUREPLANE_COMMIT_INTERVAL?)"
    ]


def test_format_duration_is_the_shortest_exact_unit() -> None:
    assert [format_duration(ms) for ms in (0, 1, 1500, 30_000, 60_000, 3_600_000)] == [
        "0ms",
        "1ms",
        "1500ms",
        "30s",
        "1m",
        "1h",
    ]


def test_backfill_times() -> None:
    assert parse_time("1763812345678") == 1_763_812_345_678
    assert parse_time("2026-11-01T00:00:00+09:00") == 1_793_458_800_000
    with pytest.raises(argparse.ArgumentTypeError, match="no timezone"):
        parse_time("2026-11-01T00:00:00")
    with pytest.raises(argparse.ArgumentTypeError, match="bad time 'yesterday'"):
        parse_time("yesterday")
    assert abs(parse_time("-1d") - (time.time() * 1000 - 86_400_000)) < 60_000


# ---------------------------------------------------------------- --version and imports


def test_version_is_the_installed_distributions() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "featureplane.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == f"featureplane {metadata.version('featureplane')}\n"


HEAVY = ("bytewax", "aiohttp", "redis", "confluent_kafka", "aioboto3")
_PROBE = """
import json, sys
{before}
from featureplane.cli import main
code = main(sys.argv[1:])
print(json.dumps([code, sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))]))
"""


def _heavy_modules_after(argv: list[str], before: str = "") -> tuple[int, list[str]]:
    """Exit status of `featureplane ARGV` in a fresh interpreter, and which of HEAVY it loaded."""
    probe = _PROBE.format(before=before, heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True
    ).stdout
    code, loaded = json.loads(out.splitlines()[-1])
    return int(code), list(loaded)


def test_validate_imports_no_broker_server_or_cache_client() -> None:
    assert _heavy_modules_after(["validate", str(EXAMPLES)]) == (0, [])
    # The probe sees such an import when there is one.
    code, loaded = _heavy_modules_after(
        ["validate", str(EXAMPLES)], before="import featureplane.cli.demo"
    )
    assert code == 0 and loaded == ["confluent_kafka"]


PARTS = [
    "serving/main.py",
    "flows/ingest.py",
    "flows/retry.py",
    "batch/load.py",
    "batch/backfill.py",
]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("part", PARTS)
def test_parts_import_neither_argparse_nor_the_cli(part: str) -> None:
    imported = _imports(REPO / part)
    assert "argparse" not in imported
    assert not {m for m in imported if m.startswith("featureplane.cli")}, imported


def test_the_cli_loads_no_module_by_name_and_reads_variables_in_two_places() -> None:
    readers = set()
    for path in sorted((REPO / "cli").glob("*.py")):
        text = path.read_text()
        assert "import_module" not in text and "__import__" not in text, path.name
        if "os.environ" in text:
            readers.add(path.name)
    # main (to name unknown FEATUREPLANE_* variables) and up (its children's environment)
    assert readers == {"__init__.py", "up.py"}
    for name in ("featureplane/settings.py", "flows/options.py", "serving/config.py", *PARTS):
        assert "os.environ" not in (REPO / name).read_text(), name


# ---------------------------------------------------------------- cluster mode


@pytest.mark.parametrize("kind", ["ingest", "retry"])
def test_bytewax_run_calls_the_flow_factory(
    kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`python -m bytewax.run "featureplane.flows.<kind>:flow()"` finds and calls `flow`."""
    from featureplane.flows import dataflow

    built = Dataflow(f"test_{kind}")
    monkeypatch.setattr(dataflow, "module_flow", lambda k: built if k == kind else None)
    monkeypatch.chdir(tmp_path)  # bytewax resolves the module from the working directory
    module, factory = _prepare_import(f"featureplane.flows.{kind}:flow()")
    assert (module, factory) == (f"featureplane.flows.{kind}", "flow()")
    assert _locate_dataflow(module, factory) is built
    assert _locate_dataflow(module, "flow") is built  # bytewax calls a bare function too
    mod = sys.modules[module]
    assert not hasattr(mod, "__getattr__")  # nothing is built on attribute access


@pytest.mark.parametrize("kind", ["ingest", "retry"])
def test_the_cluster_mode_flow_says_a_missing_spec_in_lines_not_a_traceback(
    kind: str, tmp_path: Path
) -> None:
    env = {**os.environ, "FEATUREPLANE_SPEC": str(tmp_path / "nope.yaml")}
    env["FEATUREPLANE_KAFKA_BOOTSTRAP"] = "127.0.0.1:1"
    run = subprocess.run(
        [sys.executable, "-m", "bytewax.run", f"featureplane.flows.{kind}:flow()"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "no spec at" in run.stderr and "featureplane up --demo" in run.stderr
    assert "Traceback" not in run.stderr


# ---------------------------------------------------------------- ./dev


def _dev(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "dev"), *argv], capture_output=True, text=True, timeout=30, cwd=REPO
    )


def test_dev_bench_without_a_name_lists_the_benches() -> None:
    listed = _dev("bench")
    assert listed.returncode == 0, listed.stderr
    benches = sorted((REPO / "bench").glob("*.py"))
    assert benches
    for path in benches:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = doc.splitlines()[0]  # every bench says what it measures
        assert re.search(rf"^  {path.stem} +{re.escape(first)}", listed.stdout, re.M), path.stem
    unknown = _dev("bench", "no_such_bench")
    assert unknown.returncode == 2  # as `./dev no_such_task`
    assert unknown.stdout.startswith("unknown bench: no_such_bench\n")
    assert listed.stdout in unknown.stdout
    assert "./dev bench [NAME" in _dev("help").stdout

"""The job-level gauges of a run by a workflow engine: `batch plan --shard-list` pushes the
start when it is the job's engine step, `batch report` the end (state, the shards' counts,
last success), both with POST under instance=argo; stdout of the plan step stays the JSON
list; a Pushgateway that does not answer is a warning. The Pushgateway here is a stand-in
recording what it is sent (tests/integration/test_batch_report.py uses the real one)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from featureplane.batch import metrics, plan
from featureplane.cli import main
from featureplane.jobs import cron_fires, cron_period_ms
from featureplane.settings import Settings
from featureplane.spec import Catalog, load_catalog
from tests.services import free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
AT = 1_764_473_400_000  # 2025-11-30T03:30:00Z, a fire of "30 3 * * *"
SCHEDULE = "30 3 * * *"


@dataclass
class Gateway:
    url: str
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    """(method, path, body) of every push."""
    page: str = ""
    """What GET /metrics answers."""

    def pushed(self, i: int = -1) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """{sample name: {labels: value}} of a push's body."""
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(self.calls[i][2]):
            for s in family.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    gw = Gateway("")

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            gw.calls.append((self.command, self.path, body.decode()))
            self.send_response(200)
            self.end_headers()

        do_PUT = do_POST = _record

        def do_GET(self) -> None:
            body = gw.page.encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        gw.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield gw
        server.shutdown()


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    spec = tmp_path / "spec"
    spec.mkdir()
    for name in ("groups.yaml", "ingestion.yaml"):
        (spec / name).write_text((EXAMPLES / name).read_text())
    (tmp_path / "in.jsonl").write_text('{"id": "u1", "ts": 1700000000000}\n')
    (spec / "batch.yaml").write_text(f"""\
batch_jobs:
  - name: nightly
    load: {{group: recent_user_clicked_fleaMarketArticles, source: "{tmp_path}/in.jsonl"}}
    schedule: "{SCHEDULE}"
    parallelism: 3
    timeout: 1h
""")
    return load_catalog(spec)


def _settings(tmp_path: Path, url: str | None, batch_job: str | None = "nightly") -> Settings:
    return Settings(
        _env_file=None, data_dir=tmp_path / "data", pushgateway_url=url, batch_job=batch_job
    )


def _states(pushed: dict[str, dict[Any, float]]) -> dict[str, float]:
    return {dict(k)["state"]: v for k, v in pushed["featureplane_batch_run_state"].items()}


def _one(pushed: dict[str, dict[Any, float]], name: str) -> float:
    [(labels, value)] = pushed[f"featureplane_batch_{name}"].items()
    assert dict(labels) == {"job": "nightly"}
    return value


def test_the_plan_step_pushes_the_start_and_prints_only_the_list(
    tmp_path: Path,
    catalog: Catalog,
    gateway: Gateway,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = time.time()
    settings = _settings(tmp_path, gateway.url)
    assert plan.run(settings, catalog, [], AT, as_json=False, shard_list="nightly") == 0
    out, err = capsys.readouterr()
    assert out == '["0/3","1/3","2/3"]\n'  # what Argo fans out over, and nothing else
    assert err == ""
    [(method, path, _)] = gateway.calls
    # POST: only the families pushed are replaced, so the last success stays
    assert (method, path) == ("POST", "/metrics/job/nightly/instance/argo")
    pushed = gateway.pushed()
    assert _states(pushed) == {"running": 1, "succeeded": 0, "failed": 0}
    assert before <= _one(pushed, "run_start_timestamp_seconds") <= time.time()
    assert _one(pushed, "run_timeout_seconds") == 3600
    assert _one(pushed, "shards") == 3
    assert [_one(pushed, n) for n in ("shards_done", "rows_written", "rejects")] == [0, 0, 0]
    assert _one(pushed, "next_run_timestamp_seconds") == cron_fires(SCHEDULE, AT)[0] / 1000
    assert _one(pushed, "period_seconds") == cron_period_ms(SCHEDULE, AT) / 1000 == 86400
    assert "featureplane_batch_last_success_timestamp_seconds" not in pushed


def test_a_plan_not_run_as_the_jobs_engine_step_pushes_nothing(
    tmp_path: Path, catalog: Catalog, gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    for batch_job in (None, "another"):
        settings = _settings(tmp_path, gateway.url, batch_job)
        assert plan.run(settings, catalog, [], AT, as_json=False, shard_list="nightly") == 0
    assert gateway.calls == []
    assert capsys.readouterr().out == '["0/3","1/3","2/3"]\n' * 2


def _shard_page(job: str, shards: dict[int, tuple[float, float, float, float]]) -> str:
    """A Pushgateway's page with these shards' gauges: {I: (rows, rejects, done, pushed)}."""
    lines = []
    for name, col in (("rows_written", 0), ("rejects", 1), ("done", 2)):
        lines.append(f"# TYPE featureplane_batch_shard_{name} gauge")
        for i, values in shards.items():
            lines.append(
                f'featureplane_batch_shard_{name}{{job="{job}",shard="{i}"}} {values[col]}'
            )
    lines.append("# TYPE featureplane_batch_shard_last_push_timestamp_seconds gauge")
    for i, values in shards.items():
        labels = f'job="{job}",shard="{i}"'
        lines.append(
            f"featureplane_batch_shard_last_push_timestamp_seconds{{{labels}}} {values[3]}"
        )
    return "\n".join(lines) + "\n"


def test_the_report_pushes_the_end_and_the_last_success_only_on_success(
    tmp_path: Path, catalog: Catalog, gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    at_s = AT / 1000
    gateway.page = _shard_page(
        "nightly",
        # shards 0-2 of this run; 3 of an earlier run with more shards; another job's shard
        {0: (10, 1, 1, at_s + 60), 1: (5, 0, 1, at_s + 61), 2: (0, 0, 0, at_s + 62)}
        | {3: (100, 9, 1, at_s - 3600)},
    ) + _shard_page("other", {0: (7, 7, 1, at_s + 60)}).replace("# TYPE", "# other")
    settings = _settings(tmp_path, gateway.url, None)
    job = catalog.jobs["nightly"]
    assert metrics.report(settings, job, AT, "succeeded", now_ms=AT + 90_000) == 0
    [(method, path, _)] = gateway.calls
    assert (method, path) == ("POST", "/metrics/job/nightly/instance/argo")
    pushed = gateway.pushed()
    assert _states(pushed) == {"running": 0, "succeeded": 1, "failed": 0}
    assert [_one(pushed, n) for n in ("shards_done", "rows_written", "rejects")] == [2, 15, 1]
    assert _one(pushed, "last_success_timestamp_seconds") == at_s + 90
    # what the plan step pushed stays: a POST carries none of it
    for name in ("run_start_timestamp_seconds", "run_timeout_seconds", "shards"):
        assert f"featureplane_batch_{name}" not in pushed
    # but the schedule's next fire again: a run whose plan step failed pushed no start
    assert _one(pushed, "next_run_timestamp_seconds") == cron_fires(SCHEDULE, AT)[0] / 1000

    assert metrics.report(settings, job, AT, "failed") == 1  # the engine's task fails too
    assert gateway.calls[-1][0] == "POST"
    pushed = gateway.pushed()
    assert _states(pushed) == {"running": 0, "succeeded": 0, "failed": 1}
    assert "featureplane_batch_last_success_timestamp_seconds" not in pushed
    assert "batch job nightly failed" in capsys.readouterr().err


def test_the_report_command_takes_argos_phases(
    tmp_path: Path, catalog: Catalog, gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = str(tmp_path / "spec")
    base = ["batch", "report", "nightly", "--spec", spec, "--pushgateway-url", gateway.url]
    for phase, status, state in [
        ("Succeeded", 0, "succeeded"),
        ("Failed", 1, "failed"),
        ("Error", 1, "failed"),
        ("Omitted", 1, "failed"),
        ("failed", 1, "failed"),
    ]:
        assert main([*base, "--at", "2025-11-30T03:30:00Z", "--state", phase]) == status
        assert _states(gateway.pushed())[state] == 1
    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        main([*base, "--at", "now", "--state", "Running"])
    assert exited.value.code == 2
    assert "bad state 'Running'" in capsys.readouterr().err
    assert main([*base[:2], "nightli", "--spec", spec, "--at", "now", "--state", "failed"]) == 1
    assert "unknown batch job 'nightli' (did you mean 'nightly'?)" in capsys.readouterr().err


def test_a_pushgateway_that_does_not_answer_is_a_warning(
    tmp_path: Path, catalog: Catalog, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _settings(tmp_path, f"http://127.0.0.1:{free_port()}")
    assert plan.run(settings, catalog, [], AT, as_json=False, shard_list="nightly") == 0
    out, err = capsys.readouterr()
    assert out == '["0/3","1/3","2/3"]\n'
    assert err.startswith("warning: could not push metrics to the Pushgateway at http://")
    assert metrics.report(settings, catalog.jobs["nightly"], AT, "succeeded") == 0
    err = capsys.readouterr().err
    assert "warning: could not read the shards' counts" in err
    assert "warning: could not push metrics to the Pushgateway" in err
    # no Pushgateway at all: nothing pushed, said once, the exit status still the state's
    assert metrics.report(_settings(tmp_path, None), catalog.jobs["nightly"], AT, "failed") == 1
    assert "no pushgateway_url: nothing pushed" in capsys.readouterr().err


def test_a_shard_without_a_batch_job_is_labelled_with_what_it_loads(
    tmp_path: Path,
    catalog: Catalog,
    gateway: Gateway,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FEATUREPLANE_PUSHGATEWAY_URL", gateway.url)
    monkeypatch.delenv("FEATUREPLANE_BATCH_JOB", raising=False)
    source = str(tmp_path / "in.jsonl")
    group = "recent_user_clicked_fleaMarketArticles"
    argv = ["load", "--group", group, source, "--shard", "0/1", "--at", "now"]
    assert main([*argv, "--spec", str(tmp_path / "spec"), "--data-dir", str(tmp_path)]) == 0
    [(method, path, _)] = gateway.calls
    assert (method, path) == ("PUT", "/metrics/job/load_" + group + "/shard/0")
    rows = gateway.pushed()["featureplane_batch_shard_rows_written"]
    assert rows == {(("job", f"load_{group}"), ("shard", "0")): 1}

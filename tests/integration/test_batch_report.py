"""An engine's run of a job on a real Pushgateway (prometheus-pushgateway, from Debian): the
plan step's push, the shards' pushes, then `batch report`, read back from the Pushgateway's
/metrics as Prometheus would scrape it: running -> succeeded with the shards' counts and
the last success, and a later failure keeps that last success and the run's start."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from featureplane.batch import metrics, plan
from featureplane.batch.shards import ShardResult
from featureplane.jobs import cron_fires
from featureplane.settings import Settings
from featureplane.spec import load_catalog
from tests.services import Service

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _scrape(url: str, job: str) -> dict[str, float]:
    """The job's job-level gauges ({name or name:state: value}) on the Pushgateway."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("job") != job or s.labels.get("instance") != "argo":
                continue
            name = s.name.removeprefix("featureplane_batch_")
            out[f"{name}:{s.labels['state']}" if "state" in s.labels else name] = s.value
    return out


def test_plan_then_report_gives_the_gauges_of_a_local_run(
    pushgateway: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "spec"
    spec.mkdir()
    for name in ("groups.yaml", "ingestion.yaml"):
        (spec / name).write_text((EXAMPLES / name).read_text())
    (tmp_path / "in.jsonl").write_text('{"id": "u1", "ts": 1700000000000}\n')
    (spec / "batch.yaml").write_text(f"""\
batch_jobs:
  - name: nightly
    load: {{group: recent_user_clicked_fleaMarketArticles, source: "{tmp_path}/in.jsonl"}}
    schedule: "30 3 * * *"
    parallelism: 3
    timeout: 1h
""")
    catalog = load_catalog(spec)
    job = catalog.jobs["nightly"]
    url = f"http://{pushgateway.address}"
    settings = Settings(
        _env_file=None, data_dir=tmp_path / "d", pushgateway_url=url, batch_job="nightly"
    )
    at = int(time.time() * 1000) - 60_000

    assert plan.run(settings, catalog, [], at, as_json=False, shard_list="nightly") == 0
    assert capsys.readouterr().out == '["0/3","1/3","2/3"]\n'
    started = _scrape(url, "nightly")
    assert started["run_state:running"] == 1 and started["run_state:succeeded"] == 0
    assert started["shards"] == 3 and started["shards_done"] == 0
    assert started["next_run_timestamp_seconds"] == cron_fires("30 3 * * *", at)[0] / 1000
    assert "last_success_timestamp_seconds" not in started

    for i, rows in enumerate((4, 5, 6)):
        metrics.push_shard(settings, (i, 3), ShardResult(rows, i, rows * 10))
    assert metrics.report(settings, job, at, "succeeded") == 0
    ended = _scrape(url, "nightly")
    assert (ended["run_state:running"], ended["run_state:succeeded"]) == (0, 1)
    assert (ended["shards_done"], ended["rows_written"], ended["rejects"]) == (3, 15, 3)
    assert time.time() - 60 < ended["last_success_timestamp_seconds"] <= time.time()
    # the plan step's gauges stay: the report's POST replaced only what it carried
    for name in ("run_start_timestamp_seconds", "run_timeout_seconds", "shards", "period_seconds"):
        assert ended[name] == started[name]

    # the next run fails: its start is new, the last success is the earlier one
    at2 = int(time.time() * 1000)
    assert plan.run(settings, catalog, [], at2, as_json=False, shard_list="nightly") == 0
    assert (
        _scrape(url, "nightly")["last_success_timestamp_seconds"]
        == (ended["last_success_timestamp_seconds"])
    )
    assert metrics.report(settings, job, at2, "failed") == 1
    failed = _scrape(url, "nightly")
    assert (failed["run_state:failed"], failed["run_state:succeeded"]) == (1, 0)
    assert failed["last_success_timestamp_seconds"] == ended["last_success_timestamp_seconds"]
    assert failed["run_start_timestamp_seconds"] >= ended["run_start_timestamp_seconds"]
    # no shard of the failed run pushed since its time: none of the earlier run's counts
    assert (failed["shards_done"], failed["rows_written"]) == (0, 0)

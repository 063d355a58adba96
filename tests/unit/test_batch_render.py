"""`featureplane batch render`: the manifests are valid for their engine (core kinds
against Kubernetes' schemas, Argo's kinds against Argo's pinned CRD schemas, both
strict), their structure is the spec's (DAG edges = `after`, one fan-out per job over its
plan task's output, schedules, deadlines = timeouts), the k8s engine refuses what it
cannot order, and k8s/batch.yaml is the render of k8s/spec/ (so it cannot drift)."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from featureplane.batch.render import (
    k8s_refused,
    render_argo,
    render_k8s,
    run,
    to_yaml,
)
from featureplane.batch.render_argo import PLAN_DEADLINE_S, REPORT_DEADLINE_S
from featureplane.cli.parser import build_parser
from featureplane.errors import FeatureplaneError
from featureplane.jobs import schedule_runs
from featureplane.settings import Settings
from featureplane.spec import Catalog, load_catalog
from tests.unit.test_k8s_manifests import K8S, _pod_specs, _validate

Doc = dict[str, Any]

DAG = """
batch_jobs:
  - name: stats
    load: {group: article_stats, source: "s3://b/stats/{date}/*.parquet"}
    schedule: "30 3 * * *"
    timeout: 1h
  - name: embeddings
    load: {group: article_embeddings, source: "s3://b/emb/{date}.jsonl"}
    schedule: "30 3 * * *"
    parallelism: 2
    timeout: 30m
  - name: clicks
    backfill: {topic: user-actions, from: -7d, to: now, groups: [recent_user_clicked_fleaMarketArticles]}
    after: [stats, embeddings]
    timeout: 2h
  - name: hourly
    load: {group: article_stats, source: "s3://b/hourly/*.jsonl"}
    schedule: "0 * * * *"
    parallelism: 3
    timeout: 10m
  - name: prep
    load: {group: article_stats, source: "s3://b/prep.jsonl"}
  - name: by_hand
    backfill: {topic: user-actions, from: "2026-11-01T00:00:00Z", to: "2026-11-02T00:00:00Z"}
    after: [prep]
"""


def _catalog(tmp_path: Path, jobs: str) -> Catalog:
    spec = tmp_path / "spec"
    spec.mkdir()
    for name in ("groups.yaml", "ingestion.yaml"):
        (spec / name).write_text((K8S / "spec" / name).read_text())
    (spec / "batch.yaml").write_text(jobs)
    return load_catalog(spec)


@pytest.fixture
def dag(tmp_path: Path) -> Catalog:
    return _catalog(tmp_path, DAG)


def _by(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _workflow(doc: Doc) -> Doc:
    return doc["spec"].get("workflowSpec", doc["spec"])  # type: ignore[no-any-return]


def _templates(doc: Doc) -> dict[str, Doc]:
    return {t["name"]: t for t in _workflow(doc)["templates"]}


def _tasks(doc: Doc) -> dict[str, Doc]:
    return {t["name"]: t for t in _templates(doc)["main"]["dag"]["tasks"]}


_RESULTS = {"Succeeded", "Failed", "Errored", "Skipped", "Omitted", "Daemoned"}


def _depends(task: Doc) -> dict[str, set[str]]:
    """A task's `depends` as {task: the results it names} (a bare name: its success)."""
    out: dict[str, set[str]] = {}
    for operand in re.split(r"\s*(?:&&|\|\||[()!])\s*", task.get("depends", "")):
        if operand:
            name, _, result = operand.partition(".")
            assert result in _RESULTS | {""}, operand
            out.setdefault(name, set()).add(result or "Succeeded")
    return out


# ------------------------------------------------------------------ Argo


def test_argo_manifests_are_valid(dag: Catalog) -> None:
    docs = render_argo(dag, "featureplane", "featureplane")
    assert {d["kind"] for d in docs} == {"CronWorkflow", "WorkflowTemplate", "Role", "RoleBinding"}
    assert _validate(docs) == []


def test_a_cron_workflow_per_schedule_whose_dag_is_the_specs(dag: Catalog) -> None:
    docs = render_argo(dag, "img:1", "ns")
    crons = _by(docs, "CronWorkflow")
    runs = schedule_runs(dag.jobs)
    assert sorted(c["spec"]["schedules"][0] for c in crons.values()) == sorted(runs)
    for doc in crons.values():
        spec = doc["spec"]
        assert len(doc["metadata"]["name"]) <= 52
        assert (spec["timezone"], spec["concurrencyPolicy"]) == ("UTC", "Forbid")
        [cron] = spec["schedules"]
        jobs = runs[cron]
        tasks, templates = _tasks(doc), _templates(doc)
        assert len(tasks) == 3 * len(jobs)
        # not fail-fast: a failed job lets the others end, and every job's end is reported
        assert _templates(doc)["main"]["dag"]["failFast"] is False
        for job in jobs:
            name = job.name.replace("_", "-")
            plan, fan, report = tasks[f"plan-{name}"], tasks[name], tasks[f"report-{name}"]
            # the plan waits for the jobs of `after`; the job's shards wait for its plan
            assert _depends(plan) == {a.replace("_", "-"): {"Succeeded"} for a in job.after}
            assert _depends(fan) == {f"plan-{name}": {"Succeeded"}}
            # the report waits for the job's end, however it ended
            assert _depends(report) == {
                name: {"Succeeded", "Failed", "Errored", "Omitted"},
                f"plan-{name}": {"Failed", "Errored"},
            }
            assert report["arguments"]["parameters"] == [
                {"name": "job", "value": job.name},
                {"name": "state", "value": f"{{{{tasks.{name}.status}}}}"},
            ]
            assert fan["withParam"] == f"{{{{tasks.plan-{name}.outputs.result}}}}"
            assert plan["arguments"]["parameters"] == [{"name": "job", "value": job.name}]
            shard = templates[fan["template"]]
            assert shard["activeDeadlineSeconds"] == job.timeout // 1000
            args = shard["container"]["args"]
            assert args[0] == job.kind
            assert args[args.index("--shard") + 1] == "{{inputs.parameters.shard}}"
            assert args[args.index("--at") + 1] == "{{workflow.scheduledTime}}"
            assert {"name": "FEATUREPLANE_BATCH_JOB", "value": job.name} in shard["container"][
                "env"
            ]
            assert shard["retryStrategy"]["limit"] == 2
        plan = templates["plan"]["container"]
        assert plan["args"][:3] == ["batch", "plan", "--shard-list"]
        assert plan["args"][-2:] == ["--at", "{{workflow.scheduledTime}}"]
        # the plan pushes the run's start only when told it is the job's engine step
        job_env = {"name": "FEATUREPLANE_BATCH_JOB", "value": "{{inputs.parameters.job}}"}
        assert plan["env"] == [job_env]
        report = templates["report"]
        assert report["container"]["args"] == [
            "batch",
            "report",
            "{{inputs.parameters.job}}",
            "--at",
            "{{workflow.scheduledTime}}",
            "--state",
            "{{inputs.parameters.state}}",
        ]
        assert "env" not in report["container"]
        assert report["container"]["resources"] == plan["resources"]
        # a report of a failure exits 1 on purpose: only a lost pod is tried again
        assert report["retryStrategy"]["retryPolicy"] == "OnError"
        assert report["activeDeadlineSeconds"] == REPORT_DEADLINE_S
    nightly = crons["featureplane-stats"]
    # the longest path: stats (1h) then clicks (2h), each after its plan step
    steps = 2 * PLAN_DEADLINE_S + REPORT_DEADLINE_S  # and the last job's report
    assert _workflow(nightly)["activeDeadlineSeconds"] == 3 * 3600 + steps
    hourly = _workflow(crons["featureplane-hourly"])["activeDeadlineSeconds"]
    assert hourly == 600 + PLAN_DEADLINE_S + REPORT_DEADLINE_S


def test_a_backfill_shard_passes_relative_times_in_the_equals_form(dag: Catalog) -> None:
    args = _templates(_by(render_argo(dag, "i", "n"), "CronWorkflow")["featureplane-stats"])[
        "shard-clicks"
    ]["container"]["args"]
    assert args[:6] == [
        "backfill",
        "--topic",
        "user-actions",
        "--from=-7d",
        "--to=now",
        "--groups",
    ]


def test_a_job_in_no_schedules_run_gets_a_workflow_template_with_its_dependencies(
    dag: Catalog,
) -> None:
    docs = render_argo(dag, "i", "n")
    templates = _by(docs, "WorkflowTemplate")
    assert set(templates) == {"featureplane-prep", "featureplane-by-hand"}
    template = templates["featureplane-by-hand"]
    assert set(_tasks(template)) == {
        f"{step}{job}" for step in ("plan-", "", "report-") for job in ("prep", "by-hand")
    }
    assert _depends(_tasks(template)["plan-by-hand"]) == {"prep": {"Succeeded"}}
    for name in ("shard-by-hand", "plan", "report"):
        args = _templates(template)[name]["container"]["args"]
        assert args[args.index("--at") + 1] == "{{workflow.creationTimestamp}}"
    [binding] = _by(docs, "RoleBinding").values()
    assert binding["subjects"][0]["name"] == _workflow(template)["serviceAccountName"]


def test_long_job_names_give_names_kubernetes_and_argo_take(tmp_path: Path) -> None:
    long = "Daily_" + "x" * 120
    catalog = _catalog(
        tmp_path,
        f"""
batch_jobs:
  - name: {long}
    load: {{group: article_stats, source: "a/*.jsonl"}}
    schedule: "0 1 * * *"
    parallelism: 1
""",
    )
    for doc in render_argo(catalog, "i", "n") + render_k8s(catalog, "i", "n", {long: 1}):
        name = doc["metadata"]["name"]
        assert len(name) <= 52 and name == name.lower(), name
    [cron] = _by(render_argo(catalog, "i", "n"), "CronWorkflow").values()
    assert all(len(t) <= 128 for t in _tasks(cron))


# ------------------------------------------------------------------ Kubernetes Jobs


def test_k8s_renders_indexed_jobs_only_for_jobs_outside_any_dag(dag: Catalog) -> None:
    assert k8s_refused(dag) == ["stats", "embeddings", "clicks", "prep", "by_hand"]
    docs = render_k8s(dag, "featureplane", "featureplane", {"hourly": 3}, {"hourly": "fixed"})
    assert _validate(docs) == []
    [cron] = docs
    spec = cron["spec"]
    assert spec["schedule"] == "0 * * * *" and spec["timeZone"] == "Etc/UTC"
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == 3
    assert job["backoffLimitPerIndex"] == 2 and job["activeDeadlineSeconds"] == 600
    args = job["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--shard") + 1] == "$(JOB_COMPLETION_INDEX)/3"
    assert args[args.index("--at") + 1] == "schedule:0 * * * *"
    assert cron["metadata"]["annotations"]["featureplane.io/shards-reason"] == "fixed"


def test_k8s_run_refuses_dag_jobs_by_name_and_renders_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": "1", "ts": 1, "features": {}}\n')
    jobs = (
        DAG
        + f"""
  - name: solo
    load: {{group: article_stats, source: "nowhere/*.jsonl"}}
    schedule: "15 2 * * *"
  - name: present
    load: {{group: article_stats, source: "{tmp_path}/in/*.jsonl"}}
    schedule: "15 2 * * *"
"""
    )
    catalog = _catalog(tmp_path, jobs)
    out = tmp_path / "batch.yaml"
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")
    status = run(settings, catalog, engine="k8s", output=out, image="i", namespace="featureplane")
    assert status == 1
    err = capsys.readouterr().err
    assert "stats, embeddings, clicks, prep, by_hand" in err and "--engine argo" in err
    # auto, and its input cannot be found from here: 1 shard, said in the manifest
    assert "solo" in err and "1 shard" in err
    text = out.read_text()
    assert text.startswith("# Generated by `featureplane batch render --engine k8s`")
    crons = {d["metadata"]["name"]: d for d in yaml.safe_load_all(text)}
    assert set(crons) == {"featureplane-hourly", "featureplane-solo", "featureplane-present"}
    planned = crons["featureplane-present"]["metadata"]["annotations"]
    assert planned["featureplane.io/shards-reason"].startswith("planned at render time: auto")
    assert crons["featureplane-hourly"]["spec"]["jobTemplate"]["spec"]["completions"] == 3
    cron = crons["featureplane-solo"]
    assert cron["spec"]["jobTemplate"]["spec"]["completions"] == 1
    assert (
        "not planned at render time"
        in cron["metadata"]["annotations"]["featureplane.io/shards-reason"]
    )


def test_nothing_to_render_is_a_clear_error(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)
    example = load_catalog(K8S / "spec")  # its three jobs make one DAG
    with pytest.raises(FeatureplaneError, match="no job of the spec can be rendered"):
        run(settings, example, engine="k8s", output=None, image="i", namespace="n")


# ------------------------------------------------------------------ the committed file


def test_k8s_batch_yaml_is_the_render_of_the_k8s_spec() -> None:
    docs = render_argo(load_catalog(K8S / "spec"), "featureplane", "featureplane")
    assert (K8S / "batch.yaml").read_text() == to_yaml(docs, "argo"), (
        "k8s/batch.yaml is stale: featureplane batch render --spec k8s/spec --engine argo "
        "--image featureplane -o k8s/batch.yaml"
    )


def test_validation_fails_on_unknown_fields_and_wrong_types(dag: Catalog) -> None:
    docs = render_argo(dag, "featureplane", "featureplane")
    cron = _by(docs, "CronWorkflow")["featureplane-stats"]
    broken: list[tuple[Doc, str]] = []
    for path, value, says in [
        (("spec", "schedule"), "30 3 * * *", "on v4.1.2: spec: Additional properties"),
        (("spec", "workflowSpec", "templates", 0, "dag", "tasks", 1, "dependsOn"), [], "dependsOn"),
        (("spec", "workflowSpec", "templates", 1, "retryStrategy", "retries"), 2, "retries"),
        (("spec", "workflowSpec", "templates", 2, "activeDeadlineSeconds"), {}, "not valid"),
        (("spec", "workflowSpec", "metrics", "prometheus", 0, "gauge", "live"), 1, "live"),
    ]:
        doc = copy.deepcopy(cron)
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        broken.append((doc, says))
    [job] = render_k8s(dag, "i", "featureplane", {"hourly": 2})
    job["spec"]["jobTemplate"]["spec"]["completionsMode"] = "Indexed"
    broken.append((job, "'completionsMode' was unexpected"))
    for doc, says in broken:
        found = _validate([doc])
        assert any(says in p for p in found), found


def test_every_rendered_command_line_is_one_featureplane_parses(dag: Catalog) -> None:
    # what Argo and the kubelet put in place of the placeholders
    values = {
        "{{inputs.parameters.shard}}": "1/4",
        "{{inputs.parameters.job}}": "clicks",
        "{{inputs.parameters.state}}": "Omitted",  # Argo's phase of a task not run
        "{{workflow.scheduledTime}}": "2026-11-30T03:30:00Z",
        "{{workflow.creationTimestamp}}": "2026-11-30T09:12:44Z",
        "$(JOB_COMPLETION_INDEX)": "2",
    }
    parser = build_parser()
    docs = render_argo(dag, "i", "n") + render_k8s(dag, "i", "n", {"hourly": 3})
    lines = 0
    for doc in docs:
        for _, pod in _pod_specs([doc]):
            for c in pod["containers"]:
                argv = [
                    functools.reduce(lambda a, kv: a.replace(*kv), values.items(), x)
                    for x in c["args"]
                ]
                args = parser.parse_args(argv)
                assert not any("{{" in x or "$(" in x for x in argv), argv
                if "shard" in vars(args):
                    assert args.shard in ((1, 4), (2, 3)) and args.at > 0
                if "state" in vars(args):
                    assert (args.job, args.state) == ("clicks", "failed") and args.at > 0
                lines += 1
    # a plan, a report and a shard template per job of each workflow, and the CronJob's one
    # container: nightly (plan, report, stats, embeddings, clicks), hourly, prep, by_hand
    # (prep and by_hand)
    assert lines == 5 + 3 + 3 + 4 + 1


def test_argos_own_rules_that_its_crd_schema_does_not_carry(dag: Catalog) -> None:
    # as Argo's controller validates a workflow (workflow/validate/validate.go, v3.6):
    # field names, name lengths, metric names and labels, references between tasks
    field = re.compile(r"^[a-zA-Z0-9][-a-zA-Z0-9]*$")
    metric = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    for doc in render_argo(dag, "i", "n"):
        if doc["kind"] not in ("CronWorkflow", "WorkflowTemplate"):
            continue
        assert len(doc["metadata"]["name"]) <= (52 if doc["kind"] == "CronWorkflow" else 63)
        wf, templates, tasks = _workflow(doc), _templates(doc), _tasks(doc)
        assert wf["entrypoint"] in templates
        for name in [*templates, *tasks]:
            assert field.match(name) and len(name) <= 128, name
        for task in tasks.values():
            assert task["template"] in templates
            assert "dependencies" not in task  # one kind per DAG: `depends` everywhere
            assert not task["name"][0].isdigit()  # refused with `depends`
            assert set(_depends(task)) <= set(tasks)
            # a task reads the outputs and status of the tasks it depends on only
            for ref in re.findall(r"\{\{tasks\.([-\w]+)\.", str(task)):
                assert ref in _depends(task), (task["name"], ref)
        for where in [wf, *templates.values()]:
            for m in where.get("metrics", {}).get("prometheus", []):
                assert metric.match(m["name"]) and m["help"]
                assert all(metric.match(label["key"]) for label in m.get("labels", []))
        for t in templates.values():
            declared = {p["name"] for p in t.get("inputs", {}).get("parameters", [])}
            used = set(re.findall(r"\{\{inputs\.parameters\.(\w+)\}\}", str(t)))
            assert used <= declared, t["name"]


def test_job_names_argo_would_refuse_become_distinct_task_names(tmp_path: Path) -> None:
    names = ["_x", "__x", "j_x", "A" * 128, "A" * 127 + "B", "1x"]
    jobs = "".join(
        f'\n  - {{name: {n}, load: {{group: article_stats, source: "a.jsonl"}}, '
        f'schedule: "0 1 * * *"}}'
        for n in names
    )
    catalog = _catalog(tmp_path, "batch_jobs:" + jobs + "\n")
    [cron] = _by(render_argo(catalog, "i", "n"), "CronWorkflow").values()
    tasks = [t for t in _tasks(cron) if not t.startswith(("plan-", "report-"))]
    assert len(set(tasks)) == len(names)
    assert _validate([cron]) == []

"""Argo Workflows manifests of the spec's batch jobs (`featureplane batch render --engine argo`).

Argo 3.6 or later, 4.x included: the CronWorkflows use `schedules`, which 3.5
lacks. One CronWorkflow per cron line, whose DAG does what one run of that
schedule does (`featureplane.jobs.schedule_runs`). Per job:

- `plan-<job>` prints the job's shards as a JSON list (`batch plan
  --shard-list`) and, with a Pushgateway, pushes the run's start; it waits for
  the jobs of the job's `after`, so it surveys the input as it is when the job
  starts;
- `<job>` fans out over that list, one pod per shard running `featureplane
  load|backfill --shard I/N --at <scheduled time>`;
- `report-<job>` runs `featureplane batch report` once the job ended, however
  (its shards succeeded or failed, its plan failed, or it was omitted because a
  job it is after failed), so that the job's gauges say how it ended as after
  `batch run`. The report of a failure exits 1: the report tasks are the DAG's
  leaves, whose outcome is the workflow's, so a failed job still fails it.

The DAG does not fail fast (`failFast: false`): when one job fails, the jobs
not after it still run to their end and every job's end is reported. Jobs in
no schedule's run get a WorkflowTemplate to submit by hand (`argo submit
--from workflowtemplate/<name>`), the same DAG at its creation time.
"""

from __future__ import annotations

import hashlib

from featureplane.batch.pods import (
    ACCOUNT,
    LABELS,
    RETRIES,
    STEP_RESOURCES,
    Doc,
    batch_env,
    container,
    job_args,
    metadata,
    pod_security,
    slug,
    timeout_s,
    volumes,
)
from featureplane.jobs import BatchJob, needed, schedule_runs
from featureplane.spec import Catalog

__all__ = ["PLAN_DEADLINE_S", "REPORT_DEADLINE_S", "render_argo"]

PLAN_DEADLINE_S = 600
"""How long a job's plan step may take (it lists files or asks Kafka for offsets)."""
REPORT_DEADLINE_S = 300
"""How long a job's report step may take (it reads and pushes to the Pushgateway)."""
# Which run failed, for the alert's link to it in the Argo UI (one series per failed run
# only: the counters are emitted on failure).
_WORKFLOW_LABELS = [
    {"key": "workflow", "value": "{{workflow.name}}"},
    {"key": "workflow_namespace", "value": "{{workflow.namespace}}"},
]


def _task(name: str) -> str:
    """A job name as an Argo task name (letters, digits and `-`, case kept; a name Argo
    would refuse, leading `_` or digit (with `depends`) or too long, gets a hash so that
    two never meet)."""
    s = name.replace("_", "-")
    if s[0] in "-0123456789" or len(s) > 100:
        s = f"j{s[:90]}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"
    return s


def _deadline_s(jobs: list[BatchJob]) -> int:
    """The workflow's deadline: the longest path of plan steps and job timeouts, and the
    last job's report."""
    done: dict[str, int] = {}
    for job in jobs:  # dependencies first
        start = max((done[a] for a in job.after if a in done), default=0)
        done[job.name] = start + PLAN_DEADLINE_S + timeout_s(job)
    return max(done.values()) + REPORT_DEADLINE_S


def _retry() -> Doc:
    # Always, not OnFailure or OnError alone: a shard that exits 1 (S3 or DynamoDB
    # throttling past its own retries) and one whose pod was lost (a node drained, a spot
    # instance reclaimed: an Argo error, not a failure) both deserve another try. A shard
    # with rejected rows also exits 1 and is tried again in vain, harmlessly: a rerun of
    # a shard overwrites what it wrote.
    return {
        "limit": RETRIES,
        "retryPolicy": "Always",
        "backoff": {"duration": "30s", "factor": 2, "maxDuration": "10m"},
    }


def _dag_tasks(job: BatchJob) -> list[Doc]:
    """The job's plan, fan-out and report tasks. `depends`, not `dependencies` (Argo takes
    one kind per DAG): a plain name means that task succeeded (or was skipped)."""
    name = _task(job.name)
    plan: Doc = {
        "name": f"plan-{name}",
        "template": "plan",
        "arguments": {"parameters": [{"name": "job", "value": job.name}]},
    }
    if job.after:
        plan["depends"] = " && ".join(_task(a) for a in job.after)
    fan = {
        "name": name,
        "template": f"shard-{name}",
        "depends": plan["name"],
        "withParam": f"{{{{tasks.{plan['name']}.outputs.result}}}}",
        "arguments": {"parameters": [{"name": "shard", "value": "{{item}}"}]},
    }
    # However the job ended: its shards done or failed, its plan failed (then the job is
    # Omitted), or omitted because a job it is after failed (as `batch run` skips it).
    ended = [f"{name}.{r}" for r in ("Succeeded", "Failed", "Errored", "Omitted")]
    ended += [f"plan-{name}.{r}" for r in ("Failed", "Errored")]
    report = {
        "name": f"report-{name}",
        "template": "report",
        "depends": " || ".join(ended),
        "arguments": {
            "parameters": [
                {"name": "job", "value": job.name},
                {"name": "state", "value": f"{{{{tasks.{name}.status}}}}"},
            ]
        },
    }
    return [plan, fan, report]


def _steps(image: str, at: str) -> list[Doc]:
    """The templates of every job's plan and report steps: small pods, the job's name
    their input."""
    job = "{{inputs.parameters.job}}"
    state = "{{inputs.parameters.state}}"
    plan: Doc = {
        "name": "plan",
        "inputs": {"parameters": [{"name": "job"}]},
        "activeDeadlineSeconds": PLAN_DEADLINE_S,
        "retryStrategy": _retry(),
        # stdout is the task's outputs.result: the JSON list of I/N the job fans out over;
        # FEATUREPLANE_BATCH_JOB tells it that it starts the job's run, which it pushes
        "container": container(
            "plan",
            image,
            ["batch", "plan", "--shard-list", job, "--at", at],
            [{"name": "FEATUREPLANE_BATCH_JOB", "value": job}],
            STEP_RESOURCES,
        ),
    }
    report: Doc = {
        "name": "report",
        "inputs": {"parameters": [{"name": "job"}, {"name": "state"}]},
        "activeDeadlineSeconds": REPORT_DEADLINE_S,
        # OnError only: the report of a failure exits 1 on purpose; a lost pod is retried
        "retryStrategy": {"limit": RETRIES, "retryPolicy": "OnError"},
        "container": container(
            "report",
            image,
            ["batch", "report", job, "--at", at, "--state", state],
            [],
            STEP_RESOURCES,
        ),
    }
    return [plan, report]


def _argo_templates(jobs: list[BatchJob], image: str, at: str) -> list[Doc]:
    tasks: list[Doc] = []
    templates: list[Doc] = []
    for job in jobs:
        tasks += _dag_tasks(job)
        # not `job`: Prometheus gives the Argo controller's series the scrape job's `job`
        label = [{"key": "batch_job", "value": job.name}]
        templates.append(
            {
                "name": f"shard-{_task(job.name)}",
                "inputs": {"parameters": [{"name": "shard"}]},
                "metadata": {"labels": {"featureplane.io/batch-job": slug(job.name, 63)}},
                "activeDeadlineSeconds": timeout_s(job),
                "retryStrategy": _retry(),
                "metrics": {
                    "prometheus": [
                        {
                            "name": "featureplane_batch_shard_failures_total",
                            "help": "Failed tries of batch shards (Argo: every try counts).",
                            "labels": [*label, *_WORKFLOW_LABELS],
                            "when": "{{status}} != Succeeded",
                            "counter": {"value": "1"},
                        },
                    ]
                },
                "container": container(
                    job.kind,
                    image,
                    job_args(job, "{{inputs.parameters.shard}}", at),
                    batch_env(job),
                ),
            }
        )
    # Not fail-fast: the jobs a failed one does not hold up still run, and all report.
    main = {"name": "main", "dag": {"failFast": False, "tasks": tasks}}
    return [main, *_steps(image, at), *templates]


def _workflow_spec(jobs: list[BatchJob], image: str, at: str, run: str) -> Doc:
    label = [{"key": "run", "value": run}]
    return {
        "entrypoint": "main",
        "serviceAccountName": ACCOUNT,
        "activeDeadlineSeconds": _deadline_s(jobs),
        "securityContext": pod_security(),
        "volumes": volumes(),
        "podMetadata": {"labels": dict(LABELS)},
        # The pods of failed shards stay for their logs; the rest go once done.
        "podGC": {"strategy": "OnPodSuccess"},
        "metrics": {
            "prometheus": [
                {
                    "name": "featureplane_batch_workflow_duration_seconds",
                    "help": "Seconds the batch workflow has run (Argo).",
                    "labels": label,
                    "gauge": {"realtime": True, "value": "{{workflow.duration}}"},
                },
                {
                    "name": "featureplane_batch_workflow_failures_total",
                    "help": "Batch workflows that ended failed or in error (Argo).",
                    "labels": [*label, *_WORKFLOW_LABELS],
                    "when": "{{workflow.status}} != Succeeded",
                    "counter": {"value": "1"},
                },
            ]
        },
        "templates": _argo_templates(jobs, image, at),
    }


def _executor_rbac(namespace: str) -> list[Doc]:
    """Argo 3.4+: each workflow pod's `wait` container reports its outputs (the plan's
    shard list among them) as a WorkflowTaskResult, with the pod's ServiceAccount."""
    name = "featureplane-argo-executor"
    role: Doc = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(name, namespace),
        "rules": [
            {
                "apiGroups": ["argoproj.io"],
                "resources": ["workflowtaskresults"],
                "verbs": ["create", "patch"],
            }
        ],
    }
    binding: Doc = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(name, namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": namespace}],
    }
    return [role, binding]


def render_argo(catalog: Catalog, image: str, namespace: str) -> list[Doc]:
    """A CronWorkflow per cron line, a WorkflowTemplate per job in no schedule's run, and
    the executor's Role and RoleBinding."""
    docs: list[Doc] = []
    scheduled: set[str] = set()
    for cron, jobs in schedule_runs(catalog.jobs).items():
        scheduled |= {j.name for j in jobs}
        first = next(j for j in jobs if j.schedule == cron)
        name = f"featureplane-{slug(first.name, 39)}"  # Argo: at most 52 characters
        meta = metadata(
            name,
            namespace,
            **{
                "featureplane.io/schedule": cron,
                "featureplane.io/jobs": ", ".join(j.name for j in jobs),
            },
        )
        at = "{{workflow.scheduledTime}}"  # RFC 3339: every task of a run reads the same input
        spec: Doc = {
            "schedules": [cron],
            "timezone": "UTC",
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 3600,  # a controller down at the fire time catches up
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 5,
            "workflowMetadata": {"labels": dict(LABELS)},
            "workflowSpec": _workflow_spec(jobs, image, at, name),
        }
        docs.append(
            {
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "CronWorkflow",
                "metadata": meta,
                "spec": spec,
            }
        )
    for job in catalog.jobs.values():
        if job.name in scheduled:
            continue
        jobs = needed(catalog.jobs, [job.name])
        name = f"featureplane-{slug(job.name, 50)}"
        meta = metadata(
            name, namespace, **{"featureplane.io/jobs": ", ".join(j.name for j in jobs)}
        )
        at = "{{workflow.creationTimestamp}}"
        docs.append(
            {
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "WorkflowTemplate",
                "metadata": meta,
                "spec": _workflow_spec(jobs, image, at, name),
            }
        )
    return [*docs, *_executor_rbac(namespace)] if docs else []

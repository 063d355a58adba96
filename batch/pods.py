"""The pods of rendered batch manifests: command lines, containers, security, volumes.

What every engine's pods share (`featureplane.batch.render` for Kubernetes Jobs,
`featureplane.batch.render_argo` for Argo Workflows): the same ConfigMap, Secret, spec
volume and service account as the other deployments, and Pod Security "restricted".
"""

from __future__ import annotations

import hashlib
from typing import Any

from featureplane.jobs import BatchJob

__all__ = [
    "ACCOUNT",
    "LABELS",
    "RETRIES",
    "SHARD_RESOURCES",
    "STEP_RESOURCES",
    "Doc",
    "batch_env",
    "container",
    "job_args",
    "metadata",
    "pod_security",
    "slug",
    "timeout_s",
    "volumes",
]

Doc = dict[str, Any]

RETRIES = 2
LABELS = {"app.kubernetes.io/name": "featureplane", "app.kubernetes.io/component": "batch"}
ACCOUNT = "featureplane"  # k8s/serviceaccount.yaml: IRSA for S3 and DynamoDB
USER = 10001  # the image's user (k8s/Dockerfile)


def slug(name: str, limit: int) -> str:
    """A job name as a DNS-1123 label part: lower case, `-` for `_`, cut with a hash
    when too long or when lower case would merge two names."""
    s = name.lower().replace("_", "-").strip("-") or "job"
    if len(s) > limit or s != name.replace("_", "-"):
        digest = hashlib.sha256(name.encode()).hexdigest()[:6]
        s = f"{s[: limit - 7].strip('-')}-{digest}"
    return s


def metadata(name: str, namespace: str, **annotations: str) -> Doc:
    meta: Doc = {"name": name, "namespace": namespace, "labels": dict(LABELS)}
    if annotations:
        meta["annotations"] = annotations
    return meta


def timeout_s(job: BatchJob) -> int:
    return max(1, -(-job.timeout // 1000))


def job_args(job: BatchJob, shard: str, at: str) -> list[str]:
    """The command line of one shard (`--from=-7d`: a value starting with `-` needs `=`)."""
    if job.load is not None:
        src = job.load
        return [
            "load",
            "--group",
            src.group,
            src.source,
            "--format",
            src.file_format,
            "--shard",
            shard,
            "--at",
            at,
        ]
    assert job.backfill is not None
    bf = job.backfill
    args = ["backfill", "--topic", bf.topic, f"--from={bf.from_}", f"--to={bf.to}"]
    if bf.groups:
        args += ["--groups", ",".join(bf.groups)]
    return [*args, "--shard", shard, "--at", at]


SHARD_RESOURCES = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
# A plan or report step lists files, reads Parquet footers or asks Kafka and the Pushgateway.
STEP_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}


def container(
    name: str, image: str, args: list[str], env: list[Doc], resources: Doc | None = None
) -> Doc:
    container: Doc = {
        "name": name,
        "image": image,
        "args": args,
        "envFrom": [
            {"configMapRef": {"name": "featureplane-env"}},
            {"secretRef": {"name": "featureplane-secrets"}},
        ],
        "resources": resources or SHARD_RESOURCES,
        "volumeMounts": [
            {"name": "spec", "mountPath": "/etc/featureplane/spec", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108  # an emptyDir: s3:// downloads
        ],
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if env:
        container["env"] = env
    return container


def pod_security() -> Doc:
    return {
        "runAsNonRoot": True,
        "runAsUser": USER,
        "runAsGroup": USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def volumes() -> list[Doc]:
    return [
        {"name": "spec", "configMap": {"name": "featureplane-spec"}},
        {"name": "tmp", "emptyDir": {}},  # sized by the files a load downloads
    ]


def batch_env(job: BatchJob) -> list[Doc]:
    return [{"name": "FEATUREPLANE_BATCH_JOB", "value": job.name}]

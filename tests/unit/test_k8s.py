"""The k8s manifests parse, list every file, and run commands that exist (the containers
of the Argo batch workflows too); the image holds every folder the package is built
from. (tests/unit/test_k8s_manifests.py renders them with kustomize and validates what
it gives.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from featureplane.cli.parser import COMMANDS

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"


def _docs() -> list[dict]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    present = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_workloads_run_real_commands_with_known_config() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    generated = {("ConfigMap", g["name"]) for g in kust["configMapGenerator"]}
    generated |= {("Secret", g["name"]) for g in kust["secretGenerator"]}
    names = generated | {(d["kind"], d["metadata"]["name"]) for d in _docs() if "metadata" in d}
    workloads = [d for d in _docs() if d.get("kind") == "Deployment"]
    jobs = [
        {"spec": {"template": {"spec": pod}}}
        for d in _docs()
        if d.get("kind") in ("CronJob", "CronWorkflow", "WorkflowTemplate")
        for pod in _pod_specs(d)
    ]
    assert jobs
    assert {w["metadata"]["name"] for w in workloads} == {
        "featureplane-serve",
        "featureplane-ingest",
        "featureplane-retry",
    }
    for w in [*workloads, *jobs]:
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            assert c["args"][0] in COMMANDS
            for ref in c["envFrom"]:
                kind = "ConfigMap" if "configMapRef" in ref else "Secret"
                assert (kind, next(iter(ref.values()))["name"]) in names
    for w in workloads:
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_image_copies_every_folder_the_package_is_built_from() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"featureplane", *setuptools["package-dir"].values()}
    copied = {
        line.split()[1]
        for line in (K8S / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
    }
    assert folders <= copied, folders - copied


def test_the_image_tag_is_the_package_version_and_set_in_one_place() -> None:
    from importlib import metadata

    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    [image] = [i for i in kust["images"] if i["name"] == "featureplane"]
    assert image["newTag"] == metadata.version("featureplane")
    images = [
        c["image"]
        for d in _docs()
        for spec in _pod_specs(d)
        for c in spec.get("containers", []) + spec.get("initContainers", [])
    ]
    assert images and all(i == "featureplane" for i in images), images


def _pod_specs(doc: dict) -> list[dict]:
    """Pod specs of a Deployment, Job or CronJob; of an Argo CronWorkflow or
    WorkflowTemplate, one per container template (its container alone)."""
    spec = doc.get("spec", {})
    if doc.get("kind") in ("CronWorkflow", "WorkflowTemplate"):
        wf = spec.get("workflowSpec", spec)
        return [{"containers": [t["container"]]} for t in wf["templates"] if "container" in t]
    if doc.get("kind") == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    template = spec.get("template", {}).get("spec")
    return [template] if template else []

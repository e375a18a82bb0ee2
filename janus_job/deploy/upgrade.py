"""Changing a running job: suspend, wait until its pods are gone, `helm upgrade`, resume.

The training operator never rolls a PyTorchJob's pods when its template changes, so a plain
`helm upgrade` of a running job would leave pods of the old and the new spec side by side. This flow
stops every pod first (runPolicy.suspend: true; under Kueue, which owns suspend, the job's Workload
is deactivated instead, Kueue's own way to stop a job), upgrades the release with the same spec
file, and then lets the job run again: the starter Job resumes it once precompute has succeeded
(features.mode precomputed), Kueue re-admits it, or this command resumes it. `scale` is the same flow
with training.nodes changed in the spec file, so Helm and the cluster never disagree on the size.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from janus_job.deploy.starter import (
    MIN_OPERATOR,
    PYTORCHJOB,
    QUEUE_LABEL,
    check_kubernetes_version,
)
from janus_job.errors import JobError

CRD_NAME = "pytorchjobs.kubeflow.org"
WORKLOAD = ("kueue.x-k8s.io", "v1beta1", "workloads")
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # the operator's label on every pod of a job
POLL_S = 2.0

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    chart: Path


def check_operator(api_client: Any, needs_native_sidecar: bool, log: Log) -> None:
    """The PyTorchJob CRD is installed and serves v1; with the GPU-balance sidecar, its pod template keeps
    initContainers[].restartPolicy (training-operator >= 1.8; older CRDs prune it and the pod hangs in Init)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    try:
        crd = client.ApiextensionsV1Api(api_client).read_custom_resource_definition(CRD_NAME, _preload_content=False)
    except ApiException as err:
        if err.status == 404:
            raise JobError(f"the cluster has no {CRD_NAME} CRD; fix: install the Kubeflow training-operator "
                           f">= {MIN_OPERATOR}") from None
        if err.status == 403:
            log(f"warning: not allowed to read the {CRD_NAME} CRD, so the training-operator version is not "
                f"checked; it must be >= {MIN_OPERATOR}")
            return
        raise
    import json

    crd = json.loads(crd.data)
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    if "v1" not in served:
        raise JobError(f"the {CRD_NAME} CRD does not serve v1 (serves {sorted(served) or 'nothing'}); fix: install "
                       f"training-operator >= {MIN_OPERATOR}")
    if not needs_native_sidecar:
        return
    schema = (served["v1"].get("schema") or {}).get("openAPIV3Schema") or {}
    path = ["spec", "pytorchReplicaSpecs", "*", "template", "spec", "initContainers", "[]", "restartPolicy"]
    node: Any = schema
    for part in path:
        if not isinstance(node, dict):
            node = None
            break
        if part == "*":
            node = node.get("additionalProperties")
        elif part == "[]":
            node = node.get("items")
        else:
            node = (node.get("properties") or {}).get(part)
    if node is None and not schema.get("x-kubernetes-preserve-unknown-fields"):
        raise JobError(
            f"the installed {CRD_NAME} CRD drops initContainers[].restartPolicy, so the GPU-balance sidecar would "
            f"keep every training pod in Init; fix: upgrade the Kubeflow training-operator to >= {MIN_OPERATOR}, "
            "or set monitor.enabled: false")


def _pytorchjob(custom: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes.client.rest import ApiException

    try:
        return custom.get_namespaced_custom_object(*PYTORCHJOB[:2], namespace, PYTORCHJOB[2], name)
    except ApiException as err:
        if err.status == 404:
            raise JobError(f"no PyTorchJob {name} in namespace {namespace}; fix: install it first (helm install "
                           f"<release> charts/janus-train -f job.yaml -n {namespace}), or pass --namespace") from None
        raise


def _set_suspend(custom: Any, namespace: str, name: str, suspend: bool) -> None:
    custom.patch_namespaced_custom_object(*PYTORCHJOB[:2], namespace, PYTORCHJOB[2], name,
                                          {"spec": {"runPolicy": {"suspend": suspend}}})


def _workloads(custom: Any, namespace: str, uid: str) -> list[dict[str, Any]]:
    found = custom.list_namespaced_custom_object(*WORKLOAD[:2], namespace, WORKLOAD[2],
                                                 label_selector=f"kueue.x-k8s.io/job-uid={uid}")
    return found.get("items") or []


def _set_workloads_active(custom: Any, namespace: str, workloads: list[dict[str, Any]], active: bool) -> None:
    for wl in workloads:
        custom.patch_namespaced_custom_object(*WORKLOAD[:2], namespace, WORKLOAD[2], wl["metadata"]["name"],
                                              {"spec": {"active": active}})


def wait_for_pods_gone(api_client: Any, namespace: str, name: str, timeout_s: float, log: Log) -> None:
    """Until no pod of the PyTorchJob exists (terminating pods count: they may still write a checkpoint)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        pods = core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={name}").items
        if not pods:
            return
        names = sorted(p.metadata.name for p in pods)
        if names != last:
            log(f"waiting for {len(names)} pod(s) to stop: {', '.join(names)}")
            last = names
        if time.monotonic() > deadline:
            raise JobError(f"pods of PyTorchJob {name} still exist after {timeout_s:.0f} s ({', '.join(names)}); the "
                           "job stays suspended and the release was not upgraded; fix: look at them with kubectl "
                           "describe pod, then run the command again (--wait-timeout to wait longer)")
        time.sleep(POLL_S)


def find_helm() -> str:
    helm = os.environ.get("JANUS_HELM") or shutil.which("helm")
    if not helm:
        raise JobError("helm is not on PATH; fix: install Helm 3 (https://helm.sh/docs/intro/install/) or set "
                       "JANUS_HELM to its path")
    return helm


def run_helm_upgrade(release: Release, spec_file: Path, log: Log) -> None:
    argv = [find_helm(), "upgrade", release.name, str(release.chart), "-f", str(spec_file),
            "--namespace", release.namespace]
    log("running: " + " ".join(argv))
    proc = subprocess.run(argv, check=False)
    if proc.returncode != 0:
        raise JobError(f"helm upgrade failed (exit {proc.returncode}); the job stays suspended; fix what Helm "
                       "reported and run the command again")


def upgrade(api_client: Any, spec_file: Path, release: Release, log: Log = _print,
            wait_timeout_s: float | None = None) -> None:
    """Suspends the running job, waits until its pods are gone, upgrades the release with spec_file and lets
    the job run again (see the module docstring for who resumes it)."""
    from kubernetes import client

    from janus_job.config.load import load_spec

    spec = load_spec(spec_file)
    namespace = spec.cluster.namespace or release.namespace
    release = Release(release.name, namespace, release.chart)
    log(f"Kubernetes {check_kubernetes_version(api_client)}")
    check_operator(api_client, spec.monitor.enabled, log)

    custom = client.CustomObjectsApi(api_client)
    pj = _pytorchjob(custom, namespace, spec.name)
    kueue = bool(spec.cluster.kueue_queue) or QUEUE_LABEL in (pj["metadata"].get("labels") or {})
    workloads: list[dict[str, Any]] = []
    if kueue:
        workloads = _workloads(custom, namespace, pj["metadata"]["uid"])
        _set_workloads_active(custom, namespace, workloads, False)
        log(f"deactivated Kueue Workload(s) {', '.join(w['metadata']['name'] for w in workloads) or '(none yet)'}: "
            "Kueue stops the job")
    else:
        _set_suspend(custom, namespace, spec.name, True)
        log(f"suspended PyTorchJob {spec.name}")
    timeout = wait_timeout_s if wait_timeout_s is not None else spec.cluster.termination_grace_seconds + 300
    wait_for_pods_gone(api_client, namespace, spec.name, timeout, log)

    run_helm_upgrade(release, spec_file, log)

    if kueue:
        _set_workloads_active(custom, namespace, workloads, True)
        log("reactivated the Kueue Workload(s): Kueue starts the job when it admits it")
    elif spec.features.mode == "precomputed":
        log(f"the starter Job of this revision resumes PyTorchJob {spec.name} once precompute has succeeded "
            f"(kubectl -n {namespace} logs -f job/<{spec.name}-start-N>)")
    elif spec.training.suspend:
        log(f"training.suspend is true: PyTorchJob {spec.name} stays suspended")
    else:
        _set_suspend(custom, namespace, spec.name, False)
        log(f"resumed PyTorchJob {spec.name}")


def with_nodes(text: str, nodes: int, source: str) -> str:
    """The spec text with training.nodes set to `nodes`, everything else (comments included) unchanged."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise JobError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(root, yaml.MappingNode):
        raise JobError(f"{source}: the job spec must be a YAML mapping")
    training = next((v for k, v in root.value if k.value == "training"), None)
    if not isinstance(training, yaml.MappingNode) or training.flow_style or not training.value:
        raise JobError(f"{source}: training must be a block mapping (one key per line) for `scale`; fix: set "
                       "training.nodes in the file and run `janus-job upgrade`")
    for key, value in training.value:
        if key.value == "nodes":
            return text[:value.start_mark.index] + str(nodes) + text[value.end_mark.index:]
    first = training.value[0][0].start_mark
    return text[:first.index] + f"nodes: {nodes}\n" + " " * first.column + text[first.index:]


def scale(api_client: Any, spec_file: Path, nodes: int, release: Release, log: Log = _print,
          wait_timeout_s: float | None = None) -> None:
    """The upgrade flow with training.nodes = nodes; the spec file is rewritten once Helm has upgraded."""
    from janus_job.config.load import load_spec

    text = spec_file.read_text()
    new_text = with_nodes(text, nodes, str(spec_file))
    fd, tmp = tempfile.mkstemp(dir=spec_file.parent, prefix=f".{spec_file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(new_text)
        try:
            scaled = load_spec(tmp)
        except JobError as err:
            raise JobError(str(err).replace(tmp, f"{spec_file} with training.nodes {nodes}")) from None
        if scaled.training.nodes != nodes:
            raise JobError(f"{spec_file}: could not set training.nodes; fix: edit it by hand and run janus-job upgrade")
        upgrade(api_client, Path(tmp), release, log, wait_timeout_s)
        os.replace(tmp, spec_file)
        log(f"{spec_file}: training.nodes is now {nodes}")
    finally:
        Path(tmp).unlink(missing_ok=True)

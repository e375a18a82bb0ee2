"""The starter's objects as the real Helm engine renders them: RBAC scoped to the job's own two objects,
strict Kubernetes schemas, a restricted Guaranteed pod, and the PyTorchJob held suspended for it."""

from __future__ import annotations

from pathlib import Path

import helm_python
import pytest
import yaml

from janus_job.deploy.render import CHART_DIR, render_objects
from janus_job.deploy.starter import trainer_pod_names

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def values(example: str = "r2r-2node-ib", **changes: dict) -> dict:
    data = helm_python.values_from_yaml((ROOT / "examples" / f"{example}.yaml").read_text())
    for section, fields in changes.items():
        data.setdefault(section, {}).update(fields)
    return data


def starter_objects(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objects
            if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "starter"}


def one(objects: list[dict], kind: str, component: str | None = None) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind
              and (component is None or o["metadata"]["labels"].get("app.kubernetes.io/component") == component)]
    return obj


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_the_starter_role_reaches_only_the_jobs_own_objects(example):
    # the pods rule names exactly the pods the starter reads for this PyTorchJob (Master 0, every Worker
    # up to the most nodes the job may have)
    objects = render_objects(values(example), release="r2r", namespace="janus")
    ns = values(example).get("cluster", {}).get("namespace") or "janus"  # the spec's, else the release's
    starter = starter_objects(objects)
    assert set(starter) == {"ServiceAccount", "Role", "RoleBinding", "Job"}
    precompute = one(objects, "Job", "precompute")["metadata"]["name"]
    pytorchjob = one(objects, "PyTorchJob")["metadata"]["name"]
    assert starter["Role"]["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "resourceNames": [precompute], "verbs": ["get", "watch"]},
        {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "resourceNames": [pytorchjob],
         "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["pods"], "resourceNames": trainer_pod_names(one(objects, "PyTorchJob")),
         "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    ]
    assert all(n.startswith(f"{pytorchjob}-master-") or n.startswith(f"{pytorchjob}-worker-")
               for n in starter["Role"]["rules"][2]["resourceNames"])
    sa = starter["ServiceAccount"]["metadata"]["name"]
    binding = starter["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": starter["Role"]["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]
    pod = starter["Job"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa and pod["automountServiceAccountToken"] is True
    # no other object gets API access: every other pod keeps its token unmounted
    for obj in objects:
        if obj["kind"] in ("Job", "PyTorchJob") and obj is not starter["Job"]:
            templates = ([obj["spec"]["template"]] if obj["kind"] == "Job"
                         else [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()])
            assert all(t["spec"]["automountServiceAccountToken"] is False for t in templates)
    (container,) = pod["containers"]
    queue = values(example).get("cluster", {}).get("kueue_queue")
    assert container["command"] == ["janus-job", "start", "--namespace", ns, "--pytorchjob", pytorchjob,
                                    "--precompute-job", precompute, *(["--kueue-queue", queue] if queue else [])]
    for obj in starter.values():
        assert obj["metadata"]["namespace"] == ns


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_starter_objects_pass_strict_kubernetes_schemas(example):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in starter_objects(render_objects(values(example), release="r2r", namespace="janus")).values():
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_starter_pod_is_restricted_and_guaranteed():
    job = starter_objects(render_objects(values()))["Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert c["resources"]["requests"] == c["resources"]["limits"]  # Guaranteed QoS
    assert {"cpu", "memory"} <= set(c["resources"]["limits"])
    assert all(set(v) - {"name"} <= {"emptyDir", "configMap"} for v in pod["volumes"])
    # exit 3 (precompute failed) fails the Job at once; anything else is retried a few times
    assert job["spec"]["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "start", "operator": "In", "values": [3]}}]


def test_each_helm_revision_gets_its_own_starter():
    # a finished Job never runs again: `helm upgrade` must bring a new starter to resume the re-suspended job
    with helm_python.Chart.load(CHART_DIR) as chart:
        names = []
        for revision in (1, 2):
            out = chart.render(values=values(), name="r2r", namespace="janus", revision=revision,
                               is_install=revision == 1, is_upgrade=revision > 1)
            job = yaml.safe_load(out["janus-train/templates/starter-job.yaml"])
            names.append(job["metadata"]["name"])
    assert names == ["r2r-2node-ib-start-1", "r2r-2node-ib-start-2"]


def test_precomputed_jobs_are_created_suspended_and_others_are_not():
    objects = render_objects(values())
    assert one(objects, "PyTorchJob")["spec"]["runPolicy"]["suspend"] is True
    online = render_objects(values(features={"mode": "online", "cache_vision": False}))
    assert one(online, "PyTorchJob")["spec"]["runPolicy"]["suspend"] is False
    assert not starter_objects(online)  # nothing to wait for
    held = render_objects(values(features={"mode": "online", "cache_vision": False}, training={"suspend": True}))
    assert one(held, "PyTorchJob")["spec"]["runPolicy"]["suspend"] is True


def test_kueue_gets_the_queue_label_only_when_nothing_else_holds_the_job():
    queue = {"kueue_queue": "team-a"}
    precomputed = render_objects(values(cluster=queue))
    pj = one(precomputed, "PyTorchJob")
    # created suspended and unlabelled: Kueue ignores it until the starter adds the label
    assert pj["spec"]["runPolicy"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in pj["metadata"]["labels"]
    assert starter_objects(precomputed)["Job"]["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == [
        "--kueue-queue", "team-a"]
    online = one(render_objects(values(cluster=queue, features={"mode": "online", "cache_vision": False})),
                 "PyTorchJob")
    assert online["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert online["spec"]["runPolicy"]["suspend"] is True  # Kueue admits it by unsuspending
    held = render_objects(values(cluster=queue, training={"suspend": True}))
    assert "kueue.x-k8s.io/queue-name" not in one(held, "PyTorchJob")["metadata"]["labels"]
    assert starter_objects(held)["Job"]["spec"]["template"]["spec"]["containers"][0]["command"][-1] == (
        "--leave-suspended")


def test_a_kueue_queue_name_that_is_not_a_label_value_is_refused():
    from janus_job.config.load import validate_spec
    from janus_job.errors import JobError

    data = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
    data["cluster"] = {"kueue_queue": "team-a\nhostPID: true"}
    with pytest.raises(JobError, match=r"cluster\.kueue_queue"):
        validate_spec(data)
    with pytest.raises(JobError, match="kueue_queue"):
        render_objects(values(cluster={"kueue_queue": "team-a\nhostPID: true"}))

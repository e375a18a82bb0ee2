"""The Helm chart through the real Helm engine: lint, schema, CRD and Kubernetes schema validation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import helm_python
import pytest
import yaml

from janus_job.config.load import load_spec
from janus_job.config.schema import chart_values_yaml, json_schema, spec_to_values
from janus_job.deploy.render import render_objects

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "janus-train"
CRD = ROOT.parent / "shared" / "crds" / "kubeflow.org_pytorchjobs.yaml"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
VALUE_FILES = sorted((ROOT / "examples").glob("*.yaml")) + [ALL_FEATURES]
IDS = [p.stem for p in VALUE_FILES]
K8S_VERSION = "1.33.0"


def user_values(path: Path) -> dict:
    """The file exactly as `helm install -f` reads it."""
    return helm_python.values_from_yaml(path.read_text())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {p.stem: render_objects(user_values(p)) for p in VALUE_FILES}


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def pod_templates(job: dict) -> dict[str, dict]:
    return {role: spec["template"] for role, spec in job["spec"]["pytorchReplicaSpecs"].items()}


# -- generated files are current -----------------------------------------------------------------


def test_values_schema_is_generated_from_the_spec():
    on_disk = json.loads((CHART / "values.schema.json").read_text())
    assert on_disk == json_schema(), "stale: run `janus-job schema > charts/janus-train/values.schema.json`"


def test_values_yaml_is_generated_from_the_spec():
    assert (CHART / "values.yaml").read_text() == chart_values_yaml(), \
        "stale: run `janus-job schema --values > charts/janus-train/values.yaml`"


# -- Helm itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", VALUE_FILES, ids=IDS)
def test_strict_lint(path):
    report = helm_python.lint(CHART, user_values(path), strict=True, namespace="janus", kube_version="v1.33.0")
    assert report["errors"] == [] and report["messages"] == [], report


SCHEMA_VIOLATIONS = [
    ("typo", {"trainig": {"nodes": 2}}, "trainig"),
    ("nodes-zero", {"training": {"nodes": 0}}, "nodes"),
    ("bad-enum", {"features": {"mode": "cached"}}, "mode"),
    ("wrong-type", {"deepspeed": {"zero_stage": "two"}}, "zero_stage"),
    ("name-pattern", {"name": "Bad_Name"}, "name"),
]


@pytest.mark.parametrize("case,change,word", SCHEMA_VIOLATIONS, ids=[c[0] for c in SCHEMA_VIOLATIONS])
def test_helm_refuses_values_that_violate_the_schema(case, change, word):
    values = user_values(ROOT / "examples" / "minimal.yaml")
    for key, value in change.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and key in values else value
    with helm_python.Chart.load(CHART) as chart:
        with pytest.raises(helm_python.HelmError) as err:
            chart.render(values=values, name="janus-train", namespace="janus", is_install=True)
    assert word in str(err.value)
    report = helm_python.lint(CHART, values, strict=True)
    assert report["errors"], report


# -- the spec travels unchanged ----------------------------------------------------------------


@pytest.mark.parametrize("path", VALUE_FILES, ids=IDS)
def test_configmap_holds_the_validated_spec(rendered, path, tmp_path):
    (configmap,) = by_kind(rendered[path.stem], "ConfigMap")
    mounted = tmp_path / "job.yaml"  # what the pod reads at /etc/janus/job.yaml
    mounted.write_text(configmap["data"]["job.yaml"])
    in_pod = load_spec(mounted)
    assert in_pod == load_spec(path)
    assert spec_to_values(in_pod) == spec_to_values(load_spec(path))


def test_precompute_job_survives_training_changes_and_follows_its_inputs():
    # a Job's pod template is immutable: `helm upgrade --set training.nodes=3` must not touch it,
    # while a new feature store must give a new Job (a finished one would never run again)
    values = user_values(ROOT / "examples" / "r2r-2node-ib.yaml")
    (before,) = by_kind(render_objects(values), "Job")
    values["training"]["nodes"] = 3
    values["training"]["learning_rate"] = 1e-5
    (scaled,) = by_kind(render_objects(values), "Job")
    assert scaled == before
    values["features"]["store"] = "s3://janus-features/r2r-v2"
    (moved,) = by_kind(render_objects(values), "Job")
    assert moved["metadata"]["name"] != before["metadata"]["name"]
    assert moved["metadata"]["name"].startswith("r2r-2node-ib-precompute-") and len(moved["metadata"]["name"]) == len(
        before["metadata"]["name"]
    )


def test_checksum_changes_with_the_spec():
    values = user_values(ROOT / "examples" / "minimal.yaml")
    first = by_kind(render_objects(values), "PyTorchJob")[0]
    values["training"]["learning_rate"] = 3e-5
    second = by_kind(render_objects(values), "PyTorchJob")[0]
    key = "janus-train.io/spec-checksum"
    assert first["metadata"]["labels"][key] != second["metadata"]["labels"][key]
    assert (
        pod_templates(first)["Master"]["metadata"]["annotations"][key]
        != pod_templates(second)["Master"]["metadata"]["annotations"][key]
    )


# -- what the objects say ------------------------------------------------------------------------


def test_two_node_infiniband_job(rendered):
    objects = rendered["r2r-2node-ib"]
    (job,) = by_kind(objects, "PyTorchJob")
    spec = job["spec"]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["metadata"]["namespace"] == "janus"
    assert spec["nprocPerNode"] == "8"
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    assert spec["elasticPolicy"] == {"rdzvBackend": "c10d", "minReplicas": 2, "maxReplicas": 4, "maxRestarts": 10}
    assert spec["runPolicy"]["schedulingPolicy"] == {
        "minAvailable": 2,
        "queue": "default",
        "priorityClass": "janus-train",
    }
    for template in pod_templates(job).values():
        pod = template["spec"]
        (trainer,) = pod["containers"]
        assert trainer["name"] == "pytorch"
        assert trainer["command"] == ["janus-job", "launch", "--spec", "/etc/janus/job.yaml"]
        env = {e["name"]: e.get("value") for e in trainer["env"]}
        assert env["NCCL_IB_DISABLE"] == "0" and env["NCCL_IB_HCA"] == "mlx5"
        assert env["JANUS_STATS_DIR"] == "/var/run/janus/stats"
        assert trainer["resources"]["limits"]["rdma/hca_shared_devices_a"] == 1
        assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert "IPC_LOCK" in trainer["securityContext"]["capabilities"]["add"]
        assert pod["priorityClassName"] == "janus-train"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H800"}
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Gi"}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in trainer["volumeMounts"]
    (precompute,) = by_kind(objects, "Job")
    assert precompute["spec"]["completionMode"] == "Indexed"
    assert precompute["spec"]["completions"] == precompute["spec"]["parallelism"] == 2
    (container,) = precompute["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["janus-job", "precompute", "--spec", "/etc/janus/job.yaml"]
    assert container["envFrom"] == [{"secretRef": {"name": "janus-s3"}}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_gpu_balance_sidecar_is_native_and_unprivileged(rendered):
    (job,) = by_kind(rendered["all-features-values"], "PyTorchJob")
    for template in pod_templates(job).values():
        pod = template["spec"]
        (sidecar,) = pod["initContainers"]
        assert sidecar["restartPolicy"] == "Always"
        assert sidecar["command"] == [
            "janus-job",
            "monitor",
            "--stats-dir",
            "/var/run/janus/stats",
            "--port",
            "9500",
            "--interval",
            "30",
            "--warn-ratio",
            "0.15",
            "--stale-after",
            "120",
        ]
        assert "gpu" not in json.dumps(sidecar["resources"])
        sc = sidecar["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert {"name": "metrics", "containerPort": 9500, "protocol": "TCP"} in sidecar["ports"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["/var/run/janus/stats"] == "gpu-stats"
        assert {"name": "gpu-stats", "mountPath": "/var/run/janus/stats", "readOnly": True} in sidecar["volumeMounts"]
    (monitor,) = by_kind(rendered["all-features-values"], "PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert not by_kind(rendered["minimal"], "PodMonitor")  # off by default


def test_all_features_job(rendered):
    (job,) = by_kind(rendered["all-features-values"], "PyTorchJob")
    run = job["spec"]["runPolicy"]
    assert run == {
        "backoffLimit": 20,
        "cleanPodPolicy": "Running",
        "ttlSecondsAfterFinished": 86400,
        "suspend": True,
        "schedulingPolicy": {"minAvailable": 4, "queue": "research", "priorityClass": "janus-train"},
    }
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert {r["restartPolicy"] for r in job["spec"]["pytorchReplicaSpecs"].values()} == {"ExitCode"}
    master = pod_templates(job)["Master"]
    assert master["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "roce-net"
    env = {e["name"]: e.get("value") for e in master["spec"]["containers"][0]["env"]}
    assert (
        env["NCCL_IB_GID_INDEX"] == "3" and env["NCCL_SOCKET_IFNAME"] == "eth0" and env["GLOO_SOCKET_IFNAME"] == "eth0"
    )
    assert master["spec"]["containers"][0]["image"].startswith("registry.example.com/janus-train@sha256:")
    cache = next(v for v in master["spec"]["volumes"] if v["name"] == "feature-cache")
    assert cache["emptyDir"]["sizeLimit"] == "151Gi"


@pytest.mark.parametrize("example", ["r2r-1node", "minimal"])
def test_single_node_job_has_no_worker_or_elastic_policy(rendered, example):
    # the operator's webhook wants a Worker (>= 1 replica) for elasticPolicy, so one node runs fixed
    (job,) = by_kind(rendered[example], "PyTorchJob")
    assert "elasticPolicy" not in job["spec"] and set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    assert "schedulingPolicy" not in job["spec"]["runPolicy"]
    env = {e["name"]: e.get("value") for e in pod_templates(job)["Master"]["spec"]["containers"][0]["env"]}
    assert env["NCCL_IB_DISABLE"] == "1"


def test_hostnetwork_preset_and_online_mode_without_precompute():
    values = user_values(ROOT / "examples" / "minimal.yaml")
    values["cluster"] = {"network": "hostnetwork"}
    values["features"].update(mode="online", cache_vision=False)
    values["training"]["gradient_checkpointing"] = True  # online encoders need the memory
    objects = render_objects(values)
    assert not by_kind(objects, "Job")  # nothing to precompute
    pod = pod_templates(by_kind(objects, "PyTorchJob")[0])["Master"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"


def test_recommended_labels_on_every_object(rendered):
    for objects in rendered.values():
        for obj in objects:
            labels = obj["metadata"]["labels"]
            for key in (
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by",
                "app.kubernetes.io/component",
                "helm.sh/chart",
            ):
                assert key in labels, (obj["kind"], key)


# -- schemas of the API server -------------------------------------------------------------------


def _closed(schema):
    """The CRD schema with unknown fields rejected wherever it lists properties."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        if schema.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def pytorchjob_validator():
    if not CRD.is_file():
        pytest.skip(
            f"PyTorchJob CRD not found at {CRD} (../shared/crds from the repo root); cannot check the CRD schema"
        )
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _closed(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("path", VALUE_FILES, ids=IDS)
def test_pytorchjob_matches_the_crd(rendered, pytorchjob_validator, path):
    (job,) = by_kind(rendered[path.stem], "PyTorchJob")
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in pytorchjob_validator.iter_errors(job)]
    assert errors == []


def test_crd_check_rejects_unknown_fields(rendered, pytorchjob_validator):
    (job,) = by_kind(rendered["r2r-2node-ib"], "PyTorchJob")
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["gpus"] = 8
    bad["spec"]["elasticPolicy"]["minNodes"] = 1
    messages = " ".join(e.message for e in pytorchjob_validator.iter_errors(bad))
    assert "'gpus' was unexpected" in messages and "'minNodes' was unexpected" in messages


def _strict_k8s(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", VALUE_FILES, ids=IDS)
def test_core_objects_match_kubernetes_schemas(rendered, path):
    for obj in rendered[path.stem]:
        if obj["kind"] in ("ConfigMap", "Job"):
            _strict_k8s(obj)
        elif obj["kind"] == "PyTorchJob":  # its pod templates are core PodSpecs
            for role, template in pod_templates(obj).items():
                _strict_k8s(
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {"name": f"x-{role.lower()}", **template["metadata"]},
                        "spec": template["spec"],
                    }
                )


def test_strict_kubernetes_check_can_fail(rendered):
    import kubernetes_validate

    (configmap,) = by_kind(rendered["minimal"], "ConfigMap")
    with pytest.raises(kubernetes_validate.ValidationError):
        _strict_k8s({**configmap, "spec": {"unexpected": True}})


def test_prerequisite_manifests_match_kubernetes_schemas():
    for path in sorted((ROOT / "manifests").glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            _strict_k8s(obj)
    sa = yaml.safe_load((ROOT / "manifests" / "serviceaccount.yaml").read_text())
    assert sa["automountServiceAccountToken"] is False


def test_notes_tell_how_to_follow_and_scale():
    with helm_python.Chart.load(CHART) as chart:
        out = chart.render(values=user_values(ROOT / "examples" / "r2r-2node-ib.yaml"), name="r2r", namespace="janus")
    notes = out["janus-train/templates/NOTES.txt"]
    assert "kubectl -n janus logs -f r2r-2node-ib-master-0 -c pytorch" in notes
    (job,) = by_kind(
        render_objects(user_values(ROOT / "examples" / "r2r-2node-ib.yaml"), release="r2r", namespace="janus"), "Job"
    )
    assert "-c gpu-balance" in notes and f"logs -f job/{job['metadata']['name']}" in notes
    assert "scale pytorchjob/r2r-2node-ib --replicas" in notes and "--set training.nodes=" in notes


def test_kubectl_scale_target_is_the_worker_count_the_elastic_job_follows():
    """`kubectl scale` writes the CRD's scale path; the chart renders nodes - 1 Workers there and the
    elastic range the trainer's rendezvous accepts (docs/operations.md, "Scaling a run")."""
    if not CRD.exists():
        pytest.skip(f"PyTorchJob CRD not found at {CRD} (../shared/crds from the repo root)")
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.pytorchReplicaSpecs.Worker.replicas"
    values = user_values(ROOT / "examples" / "r2r-2node-ib.yaml")
    for nodes in (2, 3, 4):  # helm upgrade --set training.nodes=N
        values["training"]["nodes"] = nodes
        (job,) = by_kind(render_objects(values), "PyTorchJob")
        assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == nodes - 1
        assert job["spec"]["elasticPolicy"]["minReplicas"] <= nodes <= job["spec"]["elasticPolicy"]["maxReplicas"]

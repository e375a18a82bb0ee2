"""The Helm chart through the real Helm engine: lint, schema, CRD and Kubernetes schema validation."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import helm_python
import pytest
import yaml

from janus_job.config.load import load_spec
from janus_job.config.schema import chart_values_yaml, json_schema, spec_to_values
from janus_job.deploy.render import render_objects

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "janus-train"
# ../shared/crds beside the checkout; JANUS_CRD_DIR names another place (a git worktree elsewhere)
CRD = Path(os.environ.get("JANUS_CRD_DIR", ROOT.parent / "shared" / "crds")) / "kubeflow.org_pytorchjobs.yaml"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
VALUE_FILES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((CHART / "ci").glob("*.yaml"))
IDS = [p.stem for p in VALUE_FILES]
K8S_VERSION = "1.33.0"


def user_values(path: Path) -> dict:
    """The file exactly as `helm install -f` reads it."""
    return helm_python.values_from_yaml(path.read_text())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {p.stem: render_objects(user_values(p)) for p in VALUE_FILES}


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    """The chart's own objects of a kind; the install/upgrade hook's objects are left out."""
    return [o for o in objects if o["kind"] == kind and "helm.sh/hook" not in o["metadata"].get("annotations", {})]


def precompute_jobs(objects: list[dict]) -> list[dict]:
    """The precompute Job(s) among the Jobs (the starter is a Job too)."""
    return [
        o for o in by_kind(objects, "Job") if o["metadata"]["labels"]["app.kubernetes.io/component"] == "precompute"
    ]


def pod_templates(job: dict) -> dict[str, dict]:
    return {role: spec["template"] for role, spec in job["spec"]["pytorchReplicaSpecs"].items()}


# -- generated files are current -----------------------------------------------------------------


def test_values_schema_is_generated_from_the_spec():
    on_disk = json.loads((CHART / "values.schema.json").read_text())
    assert on_disk == json_schema(), "stale: run `janus-job schema > charts/janus-train/values.schema.json`"


def test_values_yaml_is_generated_from_the_spec():
    text = (CHART / "values.yaml").read_text()
    assert text == chart_values_yaml(), "stale: run `janus-job schema --values > charts/janus-train/values.yaml`"
    from janus_job.config.schema import defaults_values
    from janus_job.config.spec import ClusterSpec

    assert yaml.safe_load(text) == defaults_values()  # the comments change nothing
    # every field carries its description as a `# --` comment right above it
    lines = text.splitlines()
    for name in ("rdma_resources", "pod_labels", "volumes", "checkpoint_staging_dir"):
        (at,) = [i for i, line in enumerate(lines) if line.startswith(f"  {name}:")]
        block = []
        for line in reversed(lines[:at]):
            block.insert(0, line.strip())
            if line.strip().startswith("# -- "):
                break
        words = " ".join(b.removeprefix("# -- ").removeprefix("#") for b in block).split()
        assert words == ClusterSpec.model_fields[name].description.split(), name


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
    with helm_python.Chart.load(CHART) as chart, pytest.raises(helm_python.HelmError) as err:
        chart.render(values=values, name="janus-train", namespace="janus", is_install=True)
    assert word in str(err.value)
    report = helm_python.lint(CHART, values, strict=True)
    assert report["errors"], report


# -- the spec travels unchanged ----------------------------------------------------------------


@pytest.mark.parametrize("path", VALUE_FILES, ids=IDS)
def test_configmap_holds_the_validated_spec(rendered, path, tmp_path):
    (configmap,) = [c for c in by_kind(rendered[path.stem], "ConfigMap")
                    if c["metadata"]["labels"]["app.kubernetes.io/component"] == "spec"]
    mounted = tmp_path / "job.yaml"  # what the pod reads at /etc/janus/job.yaml
    mounted.write_text(configmap["data"]["job.yaml"])
    in_pod = load_spec(mounted)
    assert in_pod == load_spec(path)
    assert spec_to_values(in_pod) == spec_to_values(load_spec(path))


def test_precompute_job_survives_training_changes_and_follows_its_inputs():
    # a Job's pod template is immutable: `helm upgrade --set training.nodes=3` must not touch it,
    # while a new feature store must give a new Job (a finished one would never run again)
    values = user_values(ROOT / "examples" / "r2r-2node-ib.yaml")
    (before,) = precompute_jobs(render_objects(values))
    values["training"]["nodes"] = 3
    values["training"]["learning_rate"] = 1e-5
    (scaled,) = precompute_jobs(render_objects(values))
    assert scaled == before
    values["features"]["store"] = "s3://janus-features/r2r-v2"
    (moved,) = precompute_jobs(render_objects(values))
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
    # elastic: every node is a Worker (no Master), so Worker.replicas is the node count
    assert {role: r["replicas"] for role, r in spec["pytorchReplicaSpecs"].items()} == {"Worker": 2}
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
        assert not [name for name in env if name.startswith("NCCL_")]  # janus-job launch sets them from the spec
        assert "JANUS_POD_IP" not in env  # only the host-network preset uses it
        assert env["JANUS_STATS_DIR"] == "/var/run/janus/stats"
        assert trainer["resources"]["limits"]["rdma/hca_shared_devices_a"] == 1
        assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert trainer["securityContext"]["capabilities"] == {"drop": ["ALL"]}  # nothing added (Pod Security)
        assert pod["priorityClassName"] == "janus-train"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H800"}
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Gi"}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in trainer["volumeMounts"]
    (precompute,) = precompute_jobs(objects)
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
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert {"name": "metrics", "containerPort": 9500, "protocol": "TCP"} in sidecar["ports"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["/var/run/janus/stats"] == "gpu-stats"
        assert {"name": "gpu-stats", "mountPath": "/var/run/janus/stats", "readOnly": True} in sidecar["volumeMounts"]
    (monitor,) = by_kind(rendered["all-features-values"], "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert not by_kind(rendered["minimal"], "PodMonitor")  # off by default


def test_all_features_job(rendered):
    (job,) = by_kind(rendered["all-features-values"], "PyTorchJob")
    run = job["spec"]["runPolicy"]
    # backoff 5 per node x 4 nodes at most; the gang is the elastic minimum (2), not training.nodes (4)
    assert run == {
        "backoffLimit": 20,
        "cleanPodPolicy": "Running",
        "ttlSecondsAfterFinished": 86400,
        "suspend": True,
        "schedulingPolicy": {"minAvailable": 2, "queue": "research", "priorityClass": "janus-train"},
    }
    assert {role: r["replicas"] for role, r in job["spec"]["pytorchReplicaSpecs"].items()} == {"Worker": 4}
    assert {r["restartPolicy"] for r in job["spec"]["pytorchReplicaSpecs"].values()} == {"ExitCode"}
    master = pod_templates(job)["Worker"]
    assert master["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "roce-net"
    assert master["spec"]["containers"][0]["image"].startswith("registry.example.com/janus-train@sha256:")
    cache = next(v for v in master["spec"]["volumes"] if v["name"] == "feature-cache")
    assert cache["emptyDir"]["sizeLimit"] == "151Gi"


def test_cluster_integration_fields_reach_the_pods(rendered):
    """cluster.pod_labels / runtime_class_name / rdma_resources / env / volumes / resource_claims: every GPU pod
    gets the labels, runtime class, env and volumes; only training pods get RDMA devices and DRA claims."""
    objects = rendered["all-features-values"]
    pod = _trainer(objects)
    (precompute,) = precompute_jobs(objects)
    for template, trainer in ((pod, True), (precompute["spec"]["template"], False)):
        labels, spec = template["metadata"]["labels"], template["spec"]
        assert labels["team"] == "nav" and labels["cost-center"] == "4711"
        assert labels["app.kubernetes.io/component"] == ("trainer" if trainer else "precompute")
        assert spec["runtimeClassName"] == "nvidia" and "schedulerName" not in spec  # volcano sets its own
        (main,) = spec["containers"]
        assert main["env"][:2] == [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "EMPTY_ONE", "value": ""}]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["weights"]["persistentVolumeClaim"] == {"claimName": "model-weights", "readOnly": True}
        assert volumes["scratch"]["persistentVolumeClaim"] == {"claimName": "janus-scratch", "readOnly": False}
        assert {"name": "weights", "mountPath": "/weights", "readOnly": True} in main["volumeMounts"]
        limits = main["resources"]["limits"]
        rdma = {k: v for k, v in limits.items() if k.startswith("rdma/")}
        assert rdma == ({"rdma/rdma_shared_device_a": 1, "rdma/rdma_shared_device_b": 2} if trainer else {})
        assert main["resources"]["requests"].items() >= rdma.items()
        claims = [{"name": "nics", "resourceClaimTemplateName": "rdma-nics"}]
        assert spec.get("resourceClaims") == (claims if trainer else None)
        assert main["resources"].get("claims") == ([{"name": "nics"}] if trainer else None)
    assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "roce-net"


def test_node_local_volumes_hold_the_cache_and_the_staging(rendered):
    """hostPath (node NVMe) and NFS volumes; features.cache_dir and cluster.checkpoint_staging_dir on the NVMe
    mount: the chart then makes neither volume, requests no node disk for them, and points the pods there."""
    objects = rendered["hostnetwork-values"]
    pod = _trainer(objects)["spec"]
    (main,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["nvme"]["hostPath"] == {"path": "/mnt/nvme0", "type": "DirectoryOrCreate"}
    assert volumes["shared"]["nfs"] == {"server": "nfs.storage.example", "path": "/exports/janus", "readOnly": False}
    assert "feature-cache" not in volumes and "checkpoint-staging" not in volumes
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert mounts["/mnt/nvme"] == "nvme" and mounts["/shared"] == "shared"
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["JANUS_CHECKPOINT_STAGING"] == "/mnt/nvme/staging"
    assert main["resources"]["requests"]["ephemeral-storage"] == "80Gi"  # /tmp 16 + HOME 64 only
    assert pod["schedulerName"] == "gpu-scheduler"
    (precompute,) = precompute_jobs(objects)
    assert precompute["spec"]["template"]["spec"]["schedulerName"] == "gpu-scheduler"
    assert "feature-cache" not in {v["name"] for v in precompute["spec"]["template"]["spec"]["volumes"]}


def test_kueue_example_leaves_suspend_to_kueue_and_asks_for_one_topology_block(rendered):
    (job,) = by_kind(rendered["kueue"], "PyTorchJob")
    # precompute first: created suspended and without the queue label; the starter adds it (then Kueue admits)
    assert job["spec"]["runPolicy"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    (starter,) = [o for o in by_kind(rendered["kueue"], "Job") if o["metadata"]["labels"][
        "app.kubernetes.io/component"] == "starter"]
    assert "--kueue-queue" in starter["spec"]["template"]["spec"]["containers"][0]["command"]
    template = _trainer(rendered["kueue"])
    annotations = template["metadata"]["annotations"]
    assert annotations["kueue.x-k8s.io/podset-required-topology"] == "topology.example.com/block"
    assert template["metadata"]["labels"]["team"] == "nav"
    values = user_values(ROOT / "examples" / "kueue.yaml")
    values["features"]["mode"] = "read_through"  # nothing to wait for: the label at once, Kueue unsuspends
    values["cluster"]["kueue_topology"] = {"level": "kubernetes.io/hostname", "mode": "preferred"}
    (job,) = by_kind(render_objects(values), "PyTorchJob")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-nav"
    assert job["spec"]["runPolicy"]["suspend"] is True
    annotations = pod_templates(job)["Worker"]["metadata"]["annotations"]
    assert annotations["kueue.x-k8s.io/podset-preferred-topology"] == "kubernetes.io/hostname"


@pytest.mark.parametrize("example", ["r2r-1node", "minimal"])
def test_single_node_job_has_no_worker_or_elastic_policy(rendered, example):
    # the operator's webhook wants a Worker (>= 1 replica) for elasticPolicy, so one node runs fixed
    (job,) = by_kind(rendered[example], "PyTorchJob")
    assert "elasticPolicy" not in job["spec"] and set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    assert "schedulingPolicy" not in job["spec"]["runPolicy"]
    limits = pod_templates(job)["Master"]["spec"]["containers"][0]["resources"]["limits"]
    assert not [name for name in limits if name.startswith("rdma/")]  # tcp: no RDMA devices


def test_hostnetwork_preset_and_online_mode_without_precompute():
    values = user_values(ROOT / "examples" / "minimal.yaml")
    values["network"] = {"preset": "hostnetwork"}
    values["features"].update(mode="online", cache_vision=False)
    values["training"]["gradient_checkpointing"] = True  # online encoders need the memory
    objects = render_objects(values)
    assert not by_kind(objects, "Job")  # nothing to precompute
    pod = pod_templates(by_kind(objects, "PyTorchJob")[0])["Master"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    # torchrun's rendezvous address comes from the pod IP, not the node name (janus-job launch --local-addr)
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["JANUS_POD_IP"] == {"name": "JANUS_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


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
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["gpus"] = 8
    bad["spec"]["elasticPolicy"]["minNodes"] = 1
    messages = " ".join(e.message for e in pytorchjob_validator.iter_errors(bad))
    assert "'gpus' was unexpected" in messages and "'minNodes' was unexpected" in messages


def _strict_k8s(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", VALUE_FILES, ids=IDS)
def test_core_objects_match_kubernetes_schemas(rendered, path):
    kinds = set()
    for obj in rendered[path.stem]:  # hook objects included
        kinds.add(obj["kind"])
        if obj["kind"] not in ("PyTorchJob", "PodMonitor"):
            _strict_k8s(obj)
        if obj["kind"] == "PyTorchJob":  # its pod templates are core PodSpecs
            for role, template in pod_templates(obj).items():
                _strict_k8s(
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {"name": f"x-{role.lower()}", **template["metadata"]},
                        "spec": template["spec"],
                    }
                )
    assert {"ConfigMap", "Job", "PyTorchJob", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


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
    # elastic: global rank 0 is whichever pod the rendezvous makes it, so NOTES follow all trainer pods
    assert "master-0 -c pytorch" not in notes
    assert "logs -f -l janus-train.io/job=r2r-2node-ib,app.kubernetes.io/component=trainer -c pytorch" in notes
    assert "logs job/r2r-2node-ib-validate" in notes
    (job,) = precompute_jobs(
        render_objects(user_values(ROOT / "examples" / "r2r-2node-ib.yaml"), release="r2r", namespace="janus")
    )
    assert "-c gpu-balance" in notes and f"logs -f job/{job['metadata']['name']}" in notes
    assert "janus-job upgrade job.yaml --release r2r --namespace janus" in notes
    assert "janus-job scale job.yaml --nodes <nodes> --release r2r --namespace janus" in notes
    assert "kubectl -n janus scale pytorchjob/r2r-2node-ib --replicas <nodes>" in notes
    assert "logs -f r2r-2node-ib-worker-0 -c gpu-balance" in notes
    assert "logs -f job/r2r-2node-ib-start-1" in notes and "describe pytorchjob r2r-2node-ib" in notes
    with helm_python.Chart.load(CHART) as chart:
        fixed = chart.render(values=user_values(ROOT / "examples" / "r2r-1node.yaml"), name="r", namespace="janus")
    assert "kubectl -n janus logs -f r2r-1node-master-0 -c pytorch" in fixed["janus-train/templates/NOTES.txt"]
    assert "--replicas" not in fixed["janus-train/templates/NOTES.txt"]  # one node: nothing to scale


def _at(obj: dict, path: str):
    """The value at a CRD JSON path such as .spec.pytorchReplicaSpecs.Worker.replicas (None when absent)."""
    for key in path.lstrip(".").split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _set(obj: dict, path: str, value) -> None:
    *parents, last = path.lstrip(".").split(".")
    for key in parents:
        obj = obj[key]
    obj[last] = value


def test_kubectl_scale_replicas_is_the_node_count_of_an_elastic_job():
    """`kubectl scale pytorchjob/<name> --replicas N` writes N at the CRD's scale path (Worker replicas): an
    elastic job is Workers only, so N is the number of training pods, down to one node
    (docs/operations.md, "Scaling a run")."""
    if not CRD.exists():
        pytest.skip(f"PyTorchJob CRD not found at {CRD} (../shared/crds from the repo root)")
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    scale = version["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.pytorchReplicaSpecs.Worker.replicas"
    assert scale["statusReplicasPath"] == ".status.replicaStatuses.Worker.active"
    values = user_values(ROOT / "examples" / "r2r-2node-ib.yaml")
    values["training"]["resize"]["min_nodes"] = 1
    for nodes in (1, 2, 4):  # helm upgrade --set training.nodes=N renders what kubectl scale reads back
        values["training"]["nodes"] = nodes
        (job,) = by_kind(render_objects(values), "PyTorchJob")
        assert "Master" not in job["spec"]["pytorchReplicaSpecs"]
        assert _at(job, scale["specReplicasPath"]) == nodes
        assert job["spec"]["elasticPolicy"]["minReplicas"] == 1 and job["spec"]["elasticPolicy"]["maxReplicas"] == 4
    for replicas in (1, 3, 4):  # kubectl scale --replicas N on the running job
        scaled = copy.deepcopy(job)
        _set(scaled, scale["specReplicasPath"], replicas)
        pods = sum(r["replicas"] for r in scaled["spec"]["pytorchReplicaSpecs"].values())
        assert pods == replicas  # one pod per node: exactly the number asked
        policy = scaled["spec"]["elasticPolicy"]
        assert policy["minReplicas"] <= replicas <= policy["maxReplicas"]  # PET_NNODES=min:max admits it
    # the operator's rendezvous (no elasticPolicy.rdzvHost): <name>-worker-0 at the Worker's pytorchjob-port
    (port,) = [p["containerPort"] for p in _trainer([job])["spec"]["containers"][0]["ports"]
               if p["name"] == "pytorchjob-port"]
    assert "rdzvHost" not in job["spec"]["elasticPolicy"] and port == 23456
    # a fixed job keeps Master + Workers: there Worker.replicas is nodes - 1, and janus-job scale is the command
    (fixed,) = by_kind(render_objects(user_values(ALL_FEATURES) | {"training": {
        **user_values(ALL_FEATURES)["training"], "resize": {"policy": "fixed"}}}), "PyTorchJob")
    assert "elasticPolicy" not in fixed["spec"]
    assert fixed["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert _at(fixed, scale["specReplicasPath"]) == 3


# -- pods that stay --------------------------------------------------------------------------------


def _trainer(objects: list[dict]) -> dict:
    """The training pod template: the Master's of a fixed job, the Workers' of an elastic one."""
    (job,) = by_kind(objects, "PyTorchJob")
    templates = pod_templates(job)
    return templates.get("Master") or templates["Worker"]


def test_checkpoint_staging_volume_and_disk_requests(rendered):
    from janus_job.config.memory import checkpoint_gib

    spec = load_spec(ROOT / "examples" / "r2r-2node-ib.yaml")
    assert 100 < checkpoint_gib(spec) < 102  # the 101 GiB measured at full size (docs/operations.md)
    pod = _trainer(rendered["r2r-2node-ib"])["spec"]
    (trainer,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    staging = volumes[mounts[env["JANUS_CHECKPOINT_STAGING"]]]
    assert staging["emptyDir"] == {"sizeLimit": "400Gi"}  # cluster.checkpoint_staging_gib
    # every node-disk emptyDir is requested: /tmp 16 + HOME 64 + feature cache 300 + staging 400
    assert trainer["resources"]["requests"]["ephemeral-storage"] == "780Gi"
    assert trainer["resources"]["requests"]["cpu"] == "96" and trainer["resources"]["limits"]["memory"] == "1000Gi"
    (precompute,) = precompute_jobs(rendered["r2r-2node-ib"])
    (worker,) = precompute["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["requests"]["ephemeral-storage"] == "380Gi"  # no staging
    assert "rdma/hca_shared_devices_a" not in worker["resources"]["limits"]  # precompute needs no RDMA

    values = user_values(ROOT / "examples" / "minimal.yaml")
    values["cluster"] = {"checkpoint_staging_gib": 500, "checkpoint_staging_storage_class": "local-nvme"}
    pod = _trainer(render_objects(values))["spec"]
    claim = next(v for v in pod["volumes"] if v["name"] == "checkpoint-staging")["ephemeral"]["volumeClaimTemplate"]
    assert claim["spec"]["storageClassName"] == "local-nvme"
    assert claim["spec"]["resources"]["requests"]["storage"] == "500Gi"
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "280Gi"  # 16 + 64 + 200
    _strict_k8s({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod})


def test_default_resources_fit_an_8_gpu_node(rendered):
    (trainer,) = _trainer(rendered["minimal"])["spec"]["containers"]
    assert trainer["resources"]["limits"] == {"cpu": "96", "memory": "900Gi", "nvidia.com/gpu": 8}


def test_restart_budget_scales_with_the_node_count():
    values = user_values(ROOT / "examples" / "r2r-2node-ib.yaml")
    for max_nodes in (2, 3, 4):
        values["training"]["resize"]["max_nodes"] = max_nodes
        (job,) = by_kind(render_objects(values), "PyTorchJob")
        assert job["spec"]["runPolicy"]["backoffLimit"] == 10 * max_nodes
        assert job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 2  # the elastic minimum


def test_disruption_budget_and_network_policy_select_the_trainer_pods(rendered):
    objects = rendered["all-features-values"]
    labels = _trainer(objects)["metadata"]["labels"]
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 0 and pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (policy,) = by_kind(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    peers, metrics = policy["spec"]["ingress"]
    # the job's own training pods, any port (rendezvous 23456, NCCL/Gloo pick theirs at run time)
    assert peers == {"from": [{"podSelector": {"matchLabels": policy["spec"]["podSelector"]["matchLabels"]}}]}
    assert metrics == {"ports": [{"port": 9500, "protocol": "TCP"}]}  # any scraper
    (precompute,) = precompute_jobs(objects)
    assert (
        not policy["spec"]["podSelector"]["matchLabels"].items()
        <= precompute["spec"]["template"]["metadata"]["labels"].items()
    )
    values = user_values(ALL_FEATURES)
    values["monitor"]["scraper_namespace"] = "monitoring"
    (policy,) = by_kind(render_objects(values), "NetworkPolicy")
    assert policy["spec"]["ingress"][1]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


INJECTION = "x\nhostPID: true\nprivileged: true"
STRING_FIELDS = [
    ("cluster", "service_account"),
    ("cluster", "priority_class"),
    ("cluster", "queue"),
    ("features", "credentials_secret"),
    ("features", "endpoint_url"),
    ("features", "cache_dir"),
    ("image", "tag"),
    ("image", "repository"),
    ("cluster", "namespace"),
    ("cluster", "rdma_resources"),
    ("cluster", "resources"),
    ("cluster", "pod_labels"),
    ("cluster", "scheduler_name"),
    ("cluster", "runtime_class_name"),
    ("cluster", "kueue_topology"),
    ("cluster", "env"),
    ("cluster", "volumes"),
    ("cluster", "resource_claims"),
    ("cluster", "checkpoint_staging_dir"),
]
# fields that hold objects or lists: the injection in each of their strings
STRUCTURED = {
    "rdma_resources": [{"name": INJECTION, "count": 1}],
    "pod_labels": {INJECTION: INJECTION},
    "kueue_topology": {"mode": INJECTION, "level": INJECTION},
    "env": [{"name": INJECTION, "value": INJECTION}],
    "volumes": [{"name": INJECTION, "mount_path": INJECTION, "pvc": {"claim_name": INJECTION}},
                {"name": "n", "mount_path": "/n", "nfs": {"server": INJECTION, "path": INJECTION}},
                {"name": "h", "mount_path": "/h", "host_path": {"path": INJECTION, "type": INJECTION}}],
    "resource_claims": [{"name": INJECTION, "resource_claim_template_name": INJECTION}],
}


@pytest.mark.parametrize("section,field", STRING_FIELDS, ids=[f"{s}.{f}" for s, f in STRING_FIELDS])
def test_spec_strings_render_as_one_scalar(section, field, tmp_path):
    """Even a string that validate would refuse stays one YAML scalar in the templates (quote/toYaml)."""
    values = user_values(ALL_FEATURES)
    if field == "resources":  # the GPU resource name is a key in requests/limits
        values[section][field]["gpu_resource_name"] = INJECTION
    elif field in STRUCTURED:
        values[section][field] = STRUCTURED[field]
    else:
        values[section][field] = INJECTION
    # the schema refuses most of these first (tests/test_spec_injection.py); here the templates alone are
    # tried, as `helm install --skip-schema-validation` would run them (a copy of the chart without its schema)
    import shutil

    chart_copy = tmp_path / "janus-train"
    shutil.copytree(CHART, chart_copy, ignore=shutil.ignore_patterns("values.schema.json"))
    with helm_python.Chart.load(chart_copy) as chart:
        rendered = chart.render(values=values, name="janus-train", namespace="default", is_install=True)
    objects = [doc for name in sorted(rendered) if name.endswith((".yaml", ".yml"))
               for doc in yaml.safe_load_all(rendered[name]) if doc]
    text = json.dumps(objects)
    assert '"hostPID"' not in text and '"privileged"' not in text
    assert json.dumps(INJECTION)[1:-1] in text

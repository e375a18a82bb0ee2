"""`janus-job upgrade` and `janus-job scale` against a local API server (tests/kube_api.py) through the
real kubernetes client and a kubeconfig. `helm` is a stand-in executable on PATH that records its argv
and the spec file it was given (only the binary call is simulated; the chart itself is covered by
tests/test_chart.py and the RBAC tests below with the real Helm engine)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kubernetes", reason="the kubernetes client is a dependency of janus-train")

from kube_api import KubeAPI  # noqa: E402
from test_starter import api_client, cli_env, write_kubeconfig  # noqa: E402

from janus_job.deploy.upgrade import check_operator, with_nodes  # noqa: E402
from janus_job.errors import JobError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NS, NAME = "janus", "janus-minimal"
JOB_LABEL = "training.kubeflow.org/job-name"

FAKE_HELM = """#!{python}
import json, os, sys, urllib.request
args = sys.argv[1:]
spec = args[args.index("-f") + 1] if "-f" in args else None
with open(os.environ["HELM_LOG"], "a") as log:
    log.write(json.dumps({{"argv": args, "spec": open(spec).read() if spec else None}}) + "\\n")
urllib.request.urlopen(os.environ["FAKE_API"] + "/version?called-by=helm").read()  # marks the moment in the API log
sys.exit(int(os.environ.get("HELM_EXIT", "0")))
"""


def crd(with_restart_policy: bool = True) -> dict:
    init_item = {"type": "object", "properties": {"name": {"type": "string"}}}
    if with_restart_policy:
        init_item["properties"]["restartPolicy"] = {"type": "string"}
    template = {"type": "object", "properties": {"spec": {"type": "object", "properties": {
        "initContainers": {"type": "array", "items": init_item}}}}}
    schema = {"type": "object", "properties": {"spec": {"type": "object", "properties": {"pytorchReplicaSpecs": {
        "type": "object", "additionalProperties": {"type": "object", "properties": {"template": template}}}}}}}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "pytorchjobs.kubeflow.org"},
            "spec": {"group": "kubeflow.org", "names": {"kind": "PyTorchJob", "plural": "pytorchjobs"}, "scope":
                     "Namespaced", "versions": [{"name": "v1", "served": True, "storage": True,
                                                 "schema": {"openAPIV3Schema": schema}}]}}


def spec_file(tmp_path: Path, **features: str) -> Path:
    data = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
    data["features"].update(features)
    if features.get("mode") == "online":
        data["features"]["cache_vision"] = False
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def operator(api: KubeAPI, deleted_after_lists: int = 2):
    """The training operator: on suspend it deletes the pods, which take a few lists to terminate."""
    seen = {"lists": 0, "suspended": False}

    def on_patch(a: KubeAPI, name: str, body: dict) -> None:
        suspend = body.get("spec", {}).get("runPolicy", {}).get("suspend")
        if suspend is True:
            seen["suspended"] = True
        elif suspend is False:  # resumed: the operator creates the pods of the current template
            a.add_pod(f"{name}-master-0", name)

    def on_list(a: KubeAPI) -> None:
        own = [w for w in a.workloads.values() if w["metadata"]["labels"]["kueue.x-k8s.io/job-uid"].endswith(NAME)]
        if seen["suspended"] or (own and not own[0]["spec"]["active"]):  # Kueue evicts a deactivated Workload
            seen["lists"] += 1
            if seen["lists"] >= deleted_after_lists:
                a.pods.clear()

    api.on_patch_pytorchjob = on_patch
    api.on_list_pods = on_list
    return seen


def run_cli(api: KubeAPI, tmp_path: Path, *args: str, helm_exit: int = 0) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    helm = bin_dir / "helm"
    helm.write_text(FAKE_HELM.format(python=sys.executable))
    helm.chmod(helm.stat().st_mode | stat.S_IXUSR)
    env = cli_env(write_kubeconfig(api, tmp_path / "kubeconfig"), HELM_LOG=str(tmp_path / "helm.log"),
                  FAKE_API=api.url, HELM_EXIT=str(helm_exit))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.pop("JANUS_HELM", None)
    return subprocess.run([sys.executable, "-m", "janus_job.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def helm_calls(tmp_path: Path) -> list[dict]:
    log = tmp_path / "helm.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def timeline(api: KubeAPI) -> list[str]:
    """The API calls that matter, in order: suspend/resume patches, pod lists with their result, helm."""
    out = []
    for method, path in api.requests:
        if path.startswith("/version?called-by=helm"):
            out.append("helm")
        elif method == "PATCH":
            out.append("patch")
        elif "/pods?" in path:
            out.append("pods")
    return out


def test_upgrade_suspends_waits_for_the_pods_runs_helm_and_resumes(tmp_path):
    spec = spec_file(tmp_path, mode="online")  # no starter: the command resumes the job itself
    with KubeAPI(NS) as api:
        api.crd = crd()
        api.add_pytorchjob(NAME, suspend=False)
        api.add_pod(f"{NAME}-master-0", NAME)
        api.add_pod(f"{NAME}-worker-0", NAME)
        operator(api, deleted_after_lists=2)
        proc = run_cli(api, tmp_path, "upgrade", str(spec), "--release", "r2r", "--namespace", NS)

    assert proc.returncode == 0, proc.stderr
    (call,) = helm_calls(tmp_path)
    assert call["argv"] == ["upgrade", "r2r", str(ROOT / "charts" / "janus-train"), "-f", str(spec), "--namespace", NS]
    assert [p[2] for p in api.patches] == [{"spec": {"runPolicy": {"suspend": True}}},
                                           {"spec": {"runPolicy": {"suspend": False}}}]
    # suspend, pods listed until none is left, only then helm, then resume: no pod of both versions
    assert timeline(api) == ["patch", "pods", "pods", "helm", "patch"]
    assert api.pytorchjobs[NAME]["spec"]["runPolicy"]["suspend"] is False
    assert api.unexpected == []


def test_upgrade_of_a_precomputed_job_leaves_the_resume_to_the_starter(tmp_path):
    spec = spec_file(tmp_path)  # features.mode precomputed (the default)
    with KubeAPI(NS) as api:
        api.crd = crd()
        api.add_pytorchjob(NAME, suspend=False)
        operator(api)
        proc = run_cli(api, tmp_path, "upgrade", str(spec), "--release", "r2r", "--namespace", NS)
    assert proc.returncode == 0, proc.stderr
    assert [p[2] for p in api.patches] == [{"spec": {"runPolicy": {"suspend": True}}}]
    assert len(helm_calls(tmp_path)) == 1 and "starter Job" in proc.stdout


def test_upgrade_under_kueue_stops_through_the_workload_and_never_patches_suspend(tmp_path):
    spec = spec_file(tmp_path, mode="online")
    with KubeAPI(NS) as api:
        api.crd = crd()
        api.add_pytorchjob(NAME, suspend=False, labels={"kueue.x-k8s.io/queue-name": "team-a"})
        api.workloads["pytorchjob-janus-minimal-1a2b3"] = {
            "metadata": {"name": "pytorchjob-janus-minimal-1a2b3",
                         "labels": {"kueue.x-k8s.io/job-uid": f"uid-{NAME}"}},
            "spec": {"active": True}}
        api.workloads["someone-else"] = {"metadata": {"name": "someone-else",
                                                      "labels": {"kueue.x-k8s.io/job-uid": "uid-other"}},
                                         "spec": {"active": True}}
        api.add_pod(f"{NAME}-master-0", NAME)
        operator(api, deleted_after_lists=1)
        proc = run_cli(api, tmp_path, "upgrade", str(spec), "--release", "r2r", "--namespace", NS)
    assert proc.returncode == 0, proc.stderr
    assert [(p[0].rsplit("/", 1)[1], p[2]) for p in api.patches] == [
        ("pytorchjob-janus-minimal-1a2b3", {"spec": {"active": False}}),
        ("pytorchjob-janus-minimal-1a2b3", {"spec": {"active": True}})]
    assert timeline(api) == ["patch", "pods", "helm", "patch"]
    assert api.pytorchjobs[NAME]["spec"]["runPolicy"]["suspend"] is False  # untouched: Kueue's
    assert api.workloads["someone-else"]["spec"]["active"] is True


def test_upgrade_refuses_an_operator_whose_crd_drops_native_sidecars(tmp_path):
    spec = spec_file(tmp_path)
    with KubeAPI(NS) as api:
        api.crd = crd(with_restart_policy=False)
        api.add_pytorchjob(NAME, suspend=False)
        proc = run_cli(api, tmp_path, "upgrade", str(spec), "--namespace", NS)
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "error: the installed pytorchjobs.kubeflow.org CRD drops initContainers[].restartPolicy")
    assert ">= 1.8" in proc.stderr and "Traceback" not in proc.stderr
    assert api.patches == [] and helm_calls(tmp_path) == []


def test_the_published_training_operator_crd_passes_the_check():
    path = ROOT.parent / "shared" / "crds" / "kubeflow.org_pytorchjobs.yaml"
    if not path.is_file():
        pytest.skip(f"PyTorchJob CRD not found at {path} (../shared/crds from the repo root)")
    lines: list[str] = []
    with KubeAPI(NS) as api:
        api.crd = yaml.safe_load(path.read_text())  # training-operator release-1.9
        check_operator(api_client(api), True, lines.append)
    assert lines == []


def test_failed_helm_upgrade_leaves_the_job_suspended(tmp_path):
    spec = spec_file(tmp_path, mode="online")
    with KubeAPI(NS) as api:
        api.crd = crd()
        api.add_pytorchjob(NAME, suspend=False)
        proc = run_cli(api, tmp_path, "upgrade", str(spec), "--namespace", NS, helm_exit=1)
    assert proc.returncode == 2
    assert "helm upgrade failed (exit 1); the job stays suspended" in proc.stderr
    assert [p[2] for p in api.patches] == [{"spec": {"runPolicy": {"suspend": True}}}]


def test_upgrade_of_a_missing_job_says_to_install_first(tmp_path):
    spec = spec_file(tmp_path)
    with KubeAPI(NS) as api:
        api.crd = crd()
        proc = run_cli(api, tmp_path, "upgrade", str(spec), "--namespace", NS)
    assert proc.returncode == 2
    assert "no PyTorchJob janus-minimal in namespace janus; fix: install it first" in proc.stderr
    assert helm_calls(tmp_path) == []


def test_a_bad_spec_is_refused_before_the_cluster_is_touched(tmp_path):
    spec = spec_file(tmp_path)
    spec.write_text(spec.read_text().replace("name: janus-minimal", "name: Janus_Minimal"))
    with KubeAPI(NS) as api:
        proc = run_cli(api, tmp_path, "upgrade", str(spec), "--namespace", NS)
    assert proc.returncode == 2 and "name" in proc.stderr and api.requests == []


def test_scale_is_the_upgrade_flow_with_the_node_count_written_to_the_spec_file(tmp_path):
    spec = tmp_path / "job.yaml"
    original = (ROOT / "examples" / "minimal.yaml").read_text().replace(
        "features:\n", "features:\n  mode: online\n  cache_vision: false\n")
    spec.write_text(original)
    with KubeAPI(NS) as api:
        api.crd = crd()
        api.add_pytorchjob(NAME, suspend=False)
        operator(api)
        proc = run_cli(api, tmp_path, "scale", str(spec), "--nodes", "3", "--release", "r2r", "--namespace", NS)
    assert proc.returncode == 0, proc.stderr
    (call,) = helm_calls(tmp_path)
    assert yaml.safe_load(call["spec"])["training"]["nodes"] == 3  # Helm got the new node count
    # the user's file now says 3 nodes (so the next upgrade keeps them); comments and layout kept
    assert spec.read_text() == original.replace("training:\n", "training:\n  nodes: 3\n")
    assert [p[2] for p in api.patches] == [{"spec": {"runPolicy": {"suspend": True}}},
                                           {"spec": {"runPolicy": {"suspend": False}}}]
    assert not list(tmp_path.glob(".job.yaml.*"))


def test_scale_refuses_a_node_count_the_spec_does_not_allow(tmp_path):
    spec = spec_file(tmp_path)
    before = spec.read_text()
    with KubeAPI(NS) as api:
        proc = run_cli(api, tmp_path, "scale", str(spec), "--nodes", "999", "--namespace", NS)
    assert proc.returncode == 2 and "training.nodes" in proc.stderr and f"{spec} with training.nodes 999" in proc.stderr
    assert spec.read_text() == before and api.requests == [] and helm_calls(tmp_path) == []


def test_with_nodes_edits_only_the_node_count():
    text = "name: a  # job\ntraining:\n  nodes: 2   # two nodes\n  checkpoint: {url: s3://c}\n"
    assert with_nodes(text, 4, "job.yaml") == text.replace("nodes: 2", "nodes: 4")
    with pytest.raises(JobError, match="training must be a block mapping"):
        with_nodes("name: a\ntraining: {nodes: 2}\n", 4, "job.yaml")

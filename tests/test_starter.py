"""The starter (janus_job/deploy/starter.py) against a local API server (tests/kube_api.py) through the
real kubernetes client: training starts only after precompute succeeded, Kueue keeps suspend, a failed
precompute becomes a Warning Event on the PyTorchJob and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kubernetes", reason="the kubernetes client is a dependency of janus-train")
from kube_api import KubeAPI
from kubernetes import client

from janus_job.deploy.starter import FAILED_EXIT, QUEUE_LABEL, Target, start
from janus_job.errors import JobError

NS, PJ, PRE = "janus", "r2r", "r2r-precompute-0a1b2c3d"
SUSPENDED = [{"type": "Suspended", "status": "True", "reason": "JobSuspended"}]


def api_client(api: KubeAPI) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = api.url
    return client.ApiClient(cfg)


def write_kubeconfig(api: KubeAPI, path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "users": [{"name": "fake", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NS}}],
    }))
    return path


def cli_env(kubeconfig: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}  # not "in a pod"
    env.update(KUBECONFIG=str(kubeconfig), PYTHONPATH=str(Path(__file__).resolve().parents[1]), **extra)
    return env


def job_reads_and_watches(api: KubeAPI) -> tuple[int, list[str]]:
    reads = sum(1 for m, p in api.requests if m == "GET" and p.startswith(f"/apis/batch/v1/namespaces/{NS}/jobs/{PRE}"))
    watches = [p for m, p in api.requests if m == "GET" and "watch=" in p and "/jobs?" in p]
    return reads, watches


def test_precompute_success_resumes_the_pytorchjob_through_a_watch():
    with KubeAPI(NS) as api:
        api.add_pytorchjob(PJ, suspend=True, conditions=SUSPENDED)  # the operator has seen it suspended
        api.add_job(PRE)  # running
        api.on_watch = lambda a: a.set_job_condition(PRE, "Complete")
        lines: list[str] = []
        assert start(api_client(api), Target(NS, PJ, PRE), lines.append) == 0

    assert api.pytorchjobs[PJ]["spec"]["runPolicy"]["suspend"] is False
    assert api.patches == [(f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs/{PJ}", "application/merge-patch+json",
                            {"spec": {"runPolicy": {"suspend": False}}})]
    # one read, then the Complete condition came through the watch on the one Job (not a poll)
    reads, watches = job_reads_and_watches(api)
    assert reads == 1 and len(watches) == 1 and "fieldSelector=metadata.name%3D" + PRE in watches[0]
    (event,) = api.events
    assert (event["type"], event["reason"]) == ("Normal", "TrainingStarted")
    ref = event["involvedObject"]
    assert (ref["apiVersion"], ref["kind"], ref["name"], ref["namespace"], ref["uid"]) == (
        "kubeflow.org/v1", "PyTorchJob", PJ, NS, f"uid-{PJ}")
    assert api.unexpected == []


def test_under_kueue_the_starter_adds_the_queue_label_and_never_touches_suspend():
    with KubeAPI(NS) as api:
        api.add_pytorchjob(PJ, suspend=True)  # Kueue's job: no Suspended acknowledgement is awaited
        api.add_job(PRE)
        api.on_watch = lambda a: a.set_job_condition(PRE, "Complete")
        assert start(api_client(api), Target(NS, PJ, PRE, kueue_queue="team-a"), lambda line: None) == 0

    (patch,) = api.patches
    assert patch[2] == {"metadata": {"labels": {QUEUE_LABEL: "team-a"}}}
    assert api.pytorchjobs[PJ]["spec"]["runPolicy"]["suspend"] is True  # Kueue unsuspends when it admits
    assert api.pytorchjobs[PJ]["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert [(e["type"], e["reason"]) for e in api.events] == [("Normal", "QueuedForAdmission")]
    assert api.unexpected == []


def test_failed_precompute_is_a_warning_event_on_the_pytorchjob_and_a_failed_starter(tmp_path):
    with KubeAPI(NS) as api:
        api.add_pytorchjob(PJ, suspend=True, conditions=SUSPENDED)
        api.add_job(PRE)
        api.on_watch = lambda a: a.set_job_condition(PRE, "Failed", "FailedIndexes", "Job has failed indexes")
        proc = subprocess.run(
            [sys.executable, "-m", "janus_job.cli", "start", "--namespace", NS, "--pytorchjob", PJ,
             "--precompute-job", PRE],
            check=False, env=cli_env(write_kubeconfig(api, tmp_path / "kubeconfig")), capture_output=True, text=True,
            timeout=120)

    assert proc.returncode == FAILED_EXIT, proc.stderr
    (event,) = api.events
    assert (event["type"], event["reason"]) == ("Warning", "PrecomputeFailed")
    assert event["involvedObject"]["kind"] == "PyTorchJob" and event["involvedObject"]["uid"] == f"uid-{PJ}"
    assert event["message"].startswith(f"precompute Job {PRE} failed: FailedIndexes: Job has failed indexes; "
                                       "training not started")
    assert "janus-job upgrade" in event["message"] and f"delete job {PRE}" in event["message"]
    assert api.patches == []  # training stays suspended
    assert api.pytorchjobs[PJ]["spec"]["runPolicy"]["suspend"] is True
    assert len(job_reads_and_watches(api)[1]) == 1  # the failure arrived on the open watch
    assert "Traceback" not in proc.stderr and api.unexpected == []


def test_resume_waits_for_the_operator_to_suspend_the_job_and_for_its_old_pods_to_go():
    # after a plain `helm upgrade` the chart re-suspends the running job; resuming before the operator
    # has acted, or while old pods still write their checkpoint, would mix two pod templates
    gets = []

    def operator(api: KubeAPI, name: str) -> None:
        gets.append(name)
        if len(gets) == 3:  # the operator catches up only by the third read
            api.pytorchjobs[name]["status"]["conditions"] = SUSPENDED

    pod_reads = []

    def kubelet(api: KubeAPI, name: str) -> None:
        pod_reads.append(name)
        if len(pod_reads) == 4:  # the terminating pods finish after one more round of reads
            api.pods.clear()

    with KubeAPI(NS) as api:
        pj = api.add_pytorchjob(PJ, suspend=True, conditions=[{"type": "Running", "status": "True"}])
        pj["spec"]["pytorchReplicaSpecs"] = {"Master": {"replicas": 1}, "Worker": {"replicas": 1}}
        api.add_pod(f"{PJ}-master-0", PJ)
        api.add_pod(f"{PJ}-worker-0", PJ)
        api.add_job(PRE, conditions=[{"type": "Complete", "status": "True"}])
        api.on_get_pytorchjob = operator
        api.on_get_pod = kubelet
        assert start(api_client(api), Target(NS, PJ, PRE), lambda line: None) == 0

    assert [p[2] for p in api.patches] == [{"spec": {"runPolicy": {"suspend": False}}}]
    calls = [f"{m} {p.rsplit('/', 1)[1]}" for m, p in api.requests
             if p.startswith((f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs/", f"/api/v1/namespaces/{NS}/pods/"))]
    # resumed only after the read that showed Suspended and a round of reads that found no pod
    assert calls == [f"GET {PJ}"] * 3 + [f"GET {PJ}-master-0", f"GET {PJ}-worker-0"] * 3 + [f"PATCH {PJ}"]
    assert job_reads_and_watches(api)[1] == []  # already Complete: no watch needed
    assert api.unexpected == []


def test_training_suspend_keeps_the_job_suspended_after_precompute():
    with KubeAPI(NS) as api:
        api.add_pytorchjob(PJ, suspend=True, conditions=SUSPENDED)
        api.add_job(PRE, conditions=[{"type": "Complete", "status": "True"}])
        assert start(api_client(api), Target(NS, PJ, PRE, leave_suspended=True), lambda line: None) == 0
    assert api.patches == []
    (event,) = api.events
    assert event["reason"] == "PrecomputeSucceeded" and "kubectl -n janus patch pytorchjob r2r" in event["message"]


def test_a_cluster_older_than_1_29_is_refused_by_name():
    with KubeAPI(NS) as api:
        api.version.update(major="1", minor="27+", gitVersion="v1.27.9-eks")
        with pytest.raises(JobError, match=r"Kubernetes v1\.27\.9-eks; janus-train needs >= 1\.29"):
            start(api_client(api), Target(NS, PJ, PRE), lambda line: None)
    assert api.patches == [] and api.events == []

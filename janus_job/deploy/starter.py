"""The starter: training starts only after the precompute Job has succeeded.

With `features.mode: precomputed` the chart creates the PyTorchJob suspended and runs one small
starter Job per Helm revision (`janus-job start`). It reads the precompute Job, then follows it with
a watch until its Complete or Failed condition:

- Complete: it resumes the PyTorchJob (`runPolicy.suspend: false`) once the training operator has
  acknowledged the suspension and every training pod of an earlier revision is gone, so no two pod
  templates run side by side (a `helm upgrade` re-renders the job suspended). Under Kueue it never
  touches `suspend`: it adds the `kueue.x-k8s.io/queue-name` label, which Kueue allows on a
  suspended job and which makes Kueue admit it.
- Failed: it records a Warning Event on the PyTorchJob (`kubectl describe pytorchjob` shows it) and
  exits with FAILED_EXIT, which the starter Job's podFailurePolicy turns into a failed Job at once.

Its Role (templates/starter-rbac.yaml) allows exactly these calls: get/watch on the one precompute
Job, get/patch on the one PyTorchJob, get on that job's training pods by name, create on Events.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from janus_job.errors import JobError

FAILED_EXIT = 3  # the starter Job's podFailurePolicy fails the Job on this code instead of retrying
PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MIN_KUBERNETES = (1, 29)  # native sidecars (the GPU-balance sidecar) are on by default from 1.29
MIN_OPERATOR = "1.8"  # training-operator: native sidecars survive its CRD schema from 1.8
COMPONENT = "janus-train-starter"
WATCH_SECONDS = 300  # one watch request; the starter re-reads the Job and watches again after it
APPEARS_WITHIN_S = 600.0  # how long an object the chart creates may take to appear
ACK_WITHIN_S = 300.0  # how long the operator may take to acknowledge a suspension

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(f"start: {line}", flush=True)


@dataclass(frozen=True)
class Target:
    """The objects one starter looks after."""

    namespace: str
    pytorchjob: str
    precompute_job: str
    kueue_queue: str | None = None
    leave_suspended: bool = False


def job_outcome(job: Any) -> tuple[str, str] | None:
    """("Complete", "") or ("Failed", "<reason>: <message>") from a batch/v1 Job's conditions; None while running."""
    conditions = (job.status.conditions if job.status else None) or []
    for cond in conditions:
        if cond.status != "True":
            continue
        if cond.type == "Complete":
            return "Complete", ""
        if cond.type == "Failed":
            detail = ": ".join(part for part in (cond.reason, cond.message) if part)
            return "Failed", detail or "no reason given"
    return None


def condition_true(obj: dict[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def check_kubernetes_version(api_client: Any) -> str:
    """The server's version; JobError when it is older than MIN_KUBERNETES."""
    from kubernetes import client

    info = client.VersionApi(api_client).get_code()
    try:
        found = (int(info.major), int("".join(ch for ch in info.minor if ch.isdigit())))
    except ValueError:
        return info.git_version  # a distribution's odd version string: nothing to compare
    if found < MIN_KUBERNETES:
        need = ".".join(map(str, MIN_KUBERNETES))
        raise JobError(
            f"the cluster runs Kubernetes {info.git_version}; janus-train needs >= {need} (native sidecar "
            f"containers); fix: upgrade the cluster")
    return info.git_version


def record_event(api_client: Any, pytorchjob: dict[str, Any], kind: str, reason: str, message: str) -> None:
    """An Event about the PyTorchJob: `kubectl describe pytorchjob <name>` lists it."""
    from kubernetes import client

    meta = pytorchjob["metadata"]
    now = dt.datetime.now(dt.UTC)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
        involved_object=client.V1ObjectReference(
            api_version="kubeflow.org/v1", kind="PyTorchJob", name=meta["name"], namespace=meta["namespace"],
            uid=meta.get("uid"), resource_version=meta.get("resourceVersion")),
        type=kind, reason=reason, message=message[:1024], count=1, first_timestamp=now, last_timestamp=now,
        source=client.V1EventSource(component=COMPONENT), reporting_component=COMPONENT,
        reporting_instance=os.environ.get("HOSTNAME") or socket.gethostname(),
    )
    client.CoreV1Api(api_client).create_namespaced_event(meta["namespace"], event)


def _read_when_present(read: Callable[[], Any], what: str, log: Log, within_s: float = APPEARS_WITHIN_S) -> Any:
    """read() once the object exists; the chart creates it together with the starter, so allow it a while."""
    from kubernetes.client.rest import ApiException

    deadline = time.monotonic() + within_s
    told = False
    while True:
        try:
            return read()
        except ApiException as err:
            if err.status != 404:
                raise
        if time.monotonic() > deadline:
            raise JobError(f"{what} does not exist after {within_s:.0f} s; fix: check `helm status` and the "
                           f"release's namespace, then `helm upgrade` to create it again")
        if not told:
            log(f"waiting for {what} to be created")
            told = True
        time.sleep(2.0)


def wait_for_precompute(api_client: Any, target: Target, log: Log = _print) -> tuple[str, str]:
    """Blocks until the precompute Job has Complete or Failed; returns job_outcome's pair. A watch from the
    Job's resourceVersion, so a condition is seen as soon as the Job controller writes it."""
    from kubernetes import client, watch
    from kubernetes.client.rest import ApiException

    batch = client.BatchV1Api(api_client)
    what = f"precompute Job {target.namespace}/{target.precompute_job}"
    while True:
        job = _read_when_present(lambda: batch.read_namespaced_job(target.precompute_job, target.namespace), what, log)
        outcome = job_outcome(job)
        if outcome:
            return outcome
        log(f"waiting for {what} (its Complete or Failed condition)")
        stream = watch.Watch()
        try:
            for event in stream.stream(batch.list_namespaced_job, target.namespace,
                                       field_selector=f"metadata.name={target.precompute_job}",
                                       resource_version=job.metadata.resource_version,
                                       timeout_seconds=WATCH_SECONDS):
                if event["type"] == "DELETED":
                    log(f"{what} was deleted; waiting for it again")
                    break
                outcome = job_outcome(event["object"])
                if outcome:
                    return outcome
        except ApiException as err:
            if err.status != 410:  # 410: the resourceVersion expired; read the Job again
                raise
        finally:
            stream.stop()


def _wait_for_suspension_ack(custom: Any, target: Target, log: Log) -> dict[str, Any]:
    """The PyTorchJob once the operator reports it Suspended: its pods are then deleted, so resuming
    starts the current pod template only. Refuses when the operator never acknowledges (too old)."""
    deadline = time.monotonic() + ACK_WITHIN_S
    told = False
    while True:
        pj = custom.get_namespaced_custom_object(*PYTORCHJOB[:2], target.namespace, PYTORCHJOB[2], target.pytorchjob)
        if condition_true(pj, "Suspended"):
            return pj
        if time.monotonic() > deadline:
            raise JobError(
                f"PyTorchJob {target.pytorchjob} has runPolicy.suspend true but the training operator has not "
                f"reported it Suspended in {ACK_WITHIN_S:.0f} s; fix: install training-operator >= {MIN_OPERATOR} "
                f"(older operators ignore suspend), then `janus-job upgrade job.yaml`")
        if not told:
            log("waiting for the training operator to report the PyTorchJob Suspended")
            told = True
        time.sleep(2.0)


def trainer_pod_names(pj: dict[str, Any]) -> list[str]:
    """Every pod name the operator may give this job: <name>-master-0 (a fixed job's Master, or one left by an
    earlier revision) and <name>-worker-<i> up to the most Workers it may have (Worker replicas, or
    elasticPolicy.maxReplicas: an elastic job is Workers only)."""
    spec = pj.get("spec") or {}
    workers = int(((spec.get("pytorchReplicaSpecs") or {}).get("Worker") or {}).get("replicas") or 0)
    workers = max(workers, int((spec.get("elasticPolicy") or {}).get("maxReplicas") or 0))
    name = pj["metadata"]["name"]
    return [f"{name}-master-0", *(f"{name}-worker-{i}" for i in range(workers))]


def _wait_for_pods_gone(api_client: Any, pj: dict[str, Any], log: Log) -> None:
    """Until no training pod of the job exists, so pods of an earlier revision (still writing their SIGTERM
    checkpoint) never run beside the new ones. Reads each pod by name: the Role allows nothing wider."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(api_client)
    replicas = ((pj.get("spec") or {}).get("pytorchReplicaSpecs") or {}).values()
    grace = max([((r.get("template") or {}).get("spec") or {}).get("terminationGracePeriodSeconds") or 30
                 for r in replicas if isinstance(r, dict)] or [30])
    deadline = time.monotonic() + int(grace) + 300
    last: list[str] | None = None
    while True:
        present = []
        for name in trainer_pod_names(pj):
            try:
                core.read_namespaced_pod(name, pj["metadata"]["namespace"])
            except ApiException as err:
                if err.status == 404:
                    continue
                raise
            present.append(name)
        if not present:
            return
        if present != last:
            log(f"waiting for {len(present)} pod(s) of the suspended job to stop: {', '.join(present)}")
            last = present
        if time.monotonic() > deadline:
            raise JobError(f"pods {', '.join(present)} still exist {int(grace) + 300} s after the job was suspended; "
                           "fix: look at them with kubectl describe pod; the job stays suspended")
        time.sleep(2.0)


def start(api_client: Any, target: Target, log: Log = _print) -> int:
    """The starter's whole run; the process exit code (0, or FAILED_EXIT when precompute failed)."""
    from kubernetes import client

    log(f"Kubernetes {check_kubernetes_version(api_client)}")
    custom = client.CustomObjectsApi(api_client)

    def read_pytorchjob() -> dict[str, Any]:
        return custom.get_namespaced_custom_object(*PYTORCHJOB[:2], target.namespace, PYTORCHJOB[2], target.pytorchjob)

    what = f"PyTorchJob {target.namespace}/{target.pytorchjob}"
    state, detail = wait_for_precompute(api_client, target, log)
    pj = _read_when_present(read_pytorchjob, what, log)

    if state == "Failed":
        message = (f"precompute Job {target.precompute_job} failed: {detail}; training not started. Fix the cause "
                   f"(kubectl -n {target.namespace} logs job/{target.precompute_job}), delete the failed Job "
                   f"(kubectl -n {target.namespace} delete job {target.precompute_job}) and run "
                   f"`janus-job upgrade job.yaml` (or helm upgrade) to precompute again")
        record_event(api_client, pj, "Warning", "PrecomputeFailed", message)
        log(message)
        return FAILED_EXIT

    if condition_true(pj, "Succeeded") or condition_true(pj, "Failed"):
        log(f"{what} has already finished; nothing to start")
        return 0
    if target.leave_suspended:
        message = (f"precompute Job {target.precompute_job} succeeded; training.suspend is true, so the job stays "
                   f"suspended: kubectl -n {target.namespace} patch pytorchjob {target.pytorchjob} --type merge "
                   "-p '{\"spec\":{\"runPolicy\":{\"suspend\":false}}}' starts it")
        if target.kueue_queue:
            message = (f"precompute Job {target.precompute_job} succeeded; training.suspend is true, so the job is "
                       f"not handed to Kueue: kubectl -n {target.namespace} label pytorchjob {target.pytorchjob} "
                       f"{QUEUE_LABEL}={target.kueue_queue} queues it")
        record_event(api_client, pj, "Normal", "PrecomputeSucceeded", message)
        log(message)
        return 0
    if target.kueue_queue:
        # Kueue owns runPolicy.suspend: the label (allowed on a suspended job) asks it to admit the job
        if (pj["metadata"].get("labels") or {}).get(QUEUE_LABEL) != target.kueue_queue:
            custom.patch_namespaced_custom_object(*PYTORCHJOB[:2], target.namespace, PYTORCHJOB[2], target.pytorchjob,
                                                  {"metadata": {"labels": {QUEUE_LABEL: target.kueue_queue}}})
        message = (f"precompute Job {target.precompute_job} succeeded; queued in Kueue LocalQueue "
                   f"{target.kueue_queue}, which starts training when it admits the job")
        record_event(api_client, pj, "Normal", "QueuedForAdmission", message)
        log(message)
        return 0
    if not ((pj.get("spec") or {}).get("runPolicy") or {}).get("suspend"):
        log(f"{what} is not suspended; nothing to start")
        return 0
    pj = _wait_for_suspension_ack(custom, target, log)
    _wait_for_pods_gone(api_client, pj, log)
    custom.patch_namespaced_custom_object(*PYTORCHJOB[:2], target.namespace, PYTORCHJOB[2], target.pytorchjob,
                                          {"spec": {"runPolicy": {"suspend": False}}})
    message = f"precompute Job {target.precompute_job} succeeded; training started (runPolicy.suspend: false)"
    record_event(api_client, pj, "Normal", "TrainingStarted", message)
    log(message)
    return 0


def api_client_from_environment(context: str | None = None) -> Any:
    """An ApiClient for the pod's ServiceAccount, else for the kubeconfig (KUBECONFIG / ~/.kube/config)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        pass
    try:
        cfg = client.Configuration()
        config.load_kube_config(context=context, client_configuration=cfg)
    except (config.ConfigException, OSError) as err:
        raise JobError(f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({err}); fix: set "
                       "KUBECONFIG or run `kubectl config use-context <cluster>`") from None
    return client.ApiClient(cfg)

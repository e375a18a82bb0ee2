"""Rules between fields of the job spec: each refusal names the field and the fix.

Structure (types, ranges, enums, unknown keys) is pydantic's job (janus_job.config.spec); the
DeepSpeed renderer's own refusals live beside it (janus_job.config.deepspeed).
"""

from __future__ import annotations

import math
import re
from typing import Any

from janus_job.config import k8s, memory
from janus_job.config.memory import checkpoint_gib, memory_problems
from janus_job.config.spec import DNS_LABEL_MAX, JobSpec
from janus_job.errors import Problem

PRECOMPUTE_HASH_LEN = 8  # the chart names the precompute Job <name>-precompute-<8 hex>
OBJECT_STORE_SCHEMES = ("s3://",)  # the object stores the image can open (s3fs); others are refused by type


def _longest_generated_suffix(spec: JobSpec) -> str:
    """The longest suffix the chart and the operators append to `name` for a DNS-label name."""
    last_worker = spec.max_nodes - 1 if spec.elastic else spec.max_nodes - 2  # elastic: Workers only
    suffixes = [
        f"-worker-{max(last_worker, 0)}",  # PyTorchJob pod and Service of the last worker
        "-master-0",
        f"-precompute-{'x' * PRECOMPUTE_HASH_LEN}-{spec.precompute.pods - 1}",  # Indexed Job pod hostname
        "-spec",
        "-validate",  # the install/upgrade hook's ConfigMap and Job
    ]
    return max(suffixes, key=len)


def spec_problems(spec: JobSpec) -> list[Problem]:
    """Every cross-field rule; empty when the spec is consistent."""
    problems: list[Problem] = []
    t, f, c = spec.training, spec.features, spec.cluster

    suffix = _longest_generated_suffix(spec)
    if len(spec.name) + len(suffix) > DNS_LABEL_MAX:
        problems.append(
            Problem(
                "name",
                f"'{spec.name}' is {len(spec.name)} characters; generated names such as '{spec.name}{suffix}' "
                f"would exceed {DNS_LABEL_MAX}",
                f"use a name of at most {DNS_LABEL_MAX - len(suffix)} characters",
            )
        )

    batch_problem = False
    if t.gradient_accumulation_steps is not None and t.global_batch_size is not None:
        expected = t.micro_batch_size * t.gradient_accumulation_steps * spec.world_size
        if expected != t.global_batch_size:
            batch_problem = True
            problems.append(
                Problem(
                    "training.global_batch_size",
                    f"{t.global_batch_size} disagrees with micro_batch_size x gradient_accumulation_steps x nodes x "
                    f"gpus_per_node = {expected}",
                    "set only one of global_batch_size and gradient_accumulation_steps (the other is derived)",
                )
            )
    elif t.global_batch_size is not None and t.global_batch_size % (t.micro_batch_size * spec.world_size):
        batch_problem = True
        problems.append(
            Problem(
                "training.global_batch_size",
                f"{t.global_batch_size} is not a multiple of micro_batch_size x nodes x gpus_per_node = "
                f"{t.micro_batch_size * spec.world_size}",
                f"use a multiple of {t.micro_batch_size * spec.world_size}",
            )
        )

    r = t.resize
    if r.policy == "fixed" and (r.min_nodes is not None or r.max_nodes is not None):
        problems.append(
            Problem(
                "training.resize.min_nodes",
                "min_nodes/max_nodes have no effect with policy 'fixed'",
                "set training.resize.policy: elastic, or remove min_nodes/max_nodes",
            )
        )
    if not spec.min_nodes <= t.nodes <= spec.max_nodes:
        problems.append(
            Problem(
                "training.nodes",
                f"{t.nodes} is outside training.resize [{spec.min_nodes}, {spec.max_nodes}]",
                "set min_nodes <= nodes <= max_nodes",
            )
        )
    elif not batch_problem:
        node_counts = range(spec.min_nodes, spec.max_nodes + 1)
        for nodes in node_counts:
            per_step = t.micro_batch_size * nodes * t.gpus_per_node
            if spec.global_batch_size % per_step:
                problems.append(
                    Problem(
                        "training.resize",
                        f"the global batch {spec.global_batch_size} cannot be kept at {nodes} nodes "
                        f"(not a multiple of micro_batch_size x {nodes} x gpus_per_node = {per_step})",
                        "narrow training.resize.min_nodes/max_nodes, or set training.global_batch_size to a common "
                        "multiple of micro_batch_size x gpus_per_node x every allowed node count (e.g. "
                        f"{math.lcm(*(t.micro_batch_size * k * t.gpus_per_node for k in node_counts))})",
                    )
                )
                break

    if t.max_steps is None and t.warmup_ratio > 0.5:
        problems.append(
            Problem(
                "training.warmup_ratio",
                f"{t.warmup_ratio} leaves most of training in warmup",
                "use a value below 0.5 (JanusVLN: 0.03)",
            )
        )

    if spec.data.min_pixels > spec.data.max_pixels:
        problems.append(
            Problem(
                "data.min_pixels",
                f"{spec.data.min_pixels} is larger than data.max_pixels {spec.data.max_pixels}",
                "make min_pixels <= max_pixels (defaults 16*28*28 and 576*28*28)",
            )
        )
    if spec.data.num_workers == 0 and spec.data.persistent_workers:
        problems.append(
            Problem(
                "data.persistent_workers",
                "requires data.num_workers > 0",
                "set persistent_workers: false or num_workers >= 1",
            )
        )

    remote_store = f.store.startswith(OBJECT_STORE_SCHEMES)
    if remote_store and f.credentials_from == "secret" and not f.credentials_secret:
        problems.append(
            Problem(
                "features.credentials_secret",
                f"the store {f.store} needs credentials and credentials_from is 'secret', but no Secret is named",
                "create the Secret from manifests/s3-credentials-secret.yaml and set features.credentials_secret to "
                "its name, or set features.credentials_from: environment to use the pod identity "
                "(IRSA/Workload Identity)",
            )
        )
    if f.endpoint_url and not remote_store:
        problems.append(
            Problem(
                "features.endpoint_url",
                f"set, but the store {f.store} is not an object-store URL",
                "remove endpoint_url or use an s3:// store",
            )
        )
    if f.endpoint_url and not re.match(r"^https?://", f.endpoint_url):
        problems.append(
            Problem(
                "features.endpoint_url",
                f"'{f.endpoint_url}' is not an http(s) URL",
                "write it like https://minio.example:9000",
            )
        )
    if f.mode == "online" and f.cache_vision:
        problems.append(
            Problem(
                "features.cache_vision",
                "has no effect in mode 'online' (nothing is read from the store)",
                "set cache_vision: false or mode: precomputed",
            )
        )

    if c.gang_scheduler == "volcano" and not c.queue:
        problems.append(
            Problem("cluster.queue", "gang_scheduler 'volcano' needs a queue", "set cluster.queue (e.g. default)")
        )
    if c.gang_scheduler != "volcano" and c.queue:
        problems.append(
            Problem(
                "cluster.queue",
                f"queues are a Volcano feature; gang_scheduler is '{c.gang_scheduler}'",
                "remove cluster.queue or set gang_scheduler: volcano",
            )
        )
    problems.extend(cluster_problems(spec))
    problems.extend(network_problems(spec.network))

    if spec.monitor.stale_after_seconds <= spec.monitor.interval_seconds:
        problems.append(
            Problem(
                "monitor.stale_after_seconds",
                f"{spec.monitor.stale_after_seconds} s is not longer than monitor.interval_seconds "
                f"{spec.monitor.interval_seconds} s, "
                "so every rank would be reported stale",
                f"use at least 2 x interval_seconds ({2 * spec.monitor.interval_seconds})",
            )
        )

    problems.extend(pod_security_problems(spec))
    problems.extend(staging_problems(spec))
    problems.extend(memory_problems(spec))
    return problems


# -- cluster integration: labels, env, volumes, claims ----------------------------------------------
# label and annotation prefixes of the chart, Kueue and the training operator
RESERVED_LABEL_PREFIXES = ("app.kubernetes.io/", "janus-train.io/", "kueue.x-k8s.io/", "training.kubeflow.org/",
                           "helm.sh/")
GANG_SCHEDULER_NAMES = {"volcano": "volcano"}  # the schedulerName the operator gives a gang's pods
RESERVED_ANNOTATION_PREFIXES = ("janus-train.io/", "kueue.x-k8s.io/podset-")
# variables the chart's pod spec sets (the fix names what sets them)
CHART_ENV = {"JANUS_SPEC": "the chart", "HOME": "the chart", "TMPDIR": "the chart", "NODE_NAME": "the chart",
             "POD_NAME": "the chart", "POD_NAMESPACE": "the chart",
             "AWS_ENDPOINT_URL": "features.endpoint_url", "AWS_ACCESS_KEY_ID": "features.credentials_secret",
             "AWS_SECRET_ACCESS_KEY": "features.credentials_secret"}


def cluster_volume_of(spec: JobSpec, path: str) -> Any:
    """The cluster.volumes entry whose mount holds `path`, or None."""
    return next((v for v in spec.cluster.volumes if k8s.inside(path, v.mount_path)), None)


def cluster_problems(spec: JobSpec) -> list[Problem]:
    """The escape hatches of `cluster`: what the chart, Kueue or the operator own is refused, and every
    volume has a mount path of its own."""
    from janus_job.config import nccl

    c, f = spec.cluster, spec.features
    problems = []
    for key in c.pod_labels:
        if key.startswith(RESERVED_LABEL_PREFIXES):
            problems.append(Problem(f"cluster.pod_labels.{key}", "this prefix belongs to the chart, Kueue or the "
                                    "training operator", "use a key of your own domain (the Kueue queue is "
                                    "cluster.kueue_queue)"))
    for key in c.pod_annotations:
        if key.startswith(RESERVED_ANNOTATION_PREFIXES):
            problems.append(Problem(f"cluster.pod_annotations.{key}", "the chart writes this annotation",
                                    "use cluster.kueue_topology for Kueue's topology, or another key"))
    gang_name = GANG_SCHEDULER_NAMES.get(c.gang_scheduler)
    if c.scheduler_name and c.gang_scheduler != "none" and c.scheduler_name != gang_name:
        problems.append(Problem("cluster.scheduler_name", f"gang_scheduler '{c.gang_scheduler}' places the pods as "
                                "one gang with its own scheduler; pods of another scheduler would not be in it",
                                "remove scheduler_name" + (f" (or set it to {gang_name})" if gang_name else "")
                                + ", or set gang_scheduler: none"))
    if c.kueue_topology and not c.kueue_queue:
        problems.append(Problem("cluster.kueue_topology", "Kueue reads the topology annotation only of a job in "
                                "one of its queues", "set cluster.kueue_queue, or remove kueue_topology"))
    rdma: set[str] = set()
    for i, res in enumerate(c.rdma_resources):
        if res.name == c.resources.gpu_resource_name or res.name in rdma:
            what = "is cluster.resources.gpu_resource_name" if res.name not in rdma else "is listed twice"
            problems.append(Problem(f"cluster.rdma_resources.{i}.name", f"{res.name} {what}",
                                    "list each RDMA resource once, and only RDMA resources"))
        rdma.add(res.name)
    default_rdma = type(c).model_fields["rdma_resources"].get_default(call_default_factory=True)
    if spec.network.preset == "tcp" and c.rdma_resources and c.rdma_resources != default_rdma:
        problems.append(Problem("cluster.rdma_resources", "has no effect with network.preset 'tcp' (no pod "
                                "requests RDMA devices)", "remove it or choose preset infiniband, roce or "
                                "hostnetwork"))

    seen: set[str] = set()
    for i, var in enumerate(c.env):
        field = f"cluster.env.{i}.name"
        if var.name in seen:
            problems.append(Problem(field, f"{var.name} is listed twice", "list each variable once"))
        seen.add(var.name)
        if var.name in CHART_ENV:
            problems.append(Problem(field, f"{var.name} is set by janus-train", f"set {CHART_ENV[var.name]} instead"
                                    if CHART_ENV[var.name] != "the chart" else "remove it"))
        elif var.name in nccl.OWNED_ENV or var.name.startswith(("NCCL_", "GLOO_")):
            problems.append(Problem(field, f"{var.name} is a network variable", "put it in network.env (janus-job "
                                    "launch checks it there)"))
        elif var.name in nccl.RUNTIME_ENV or var.name.startswith(nccl.RUNTIME_ENV_PREFIXES):
            problems.append(Problem(field, f"{var.name} is set by torchrun, the training operator or janus-train",
                                    "remove it"))

    taken = {m: "a volume of the chart" for m in k8s.CHART_MOUNTS}
    own = [("cluster.checkpoint_staging_dir", c.checkpoint_staging_dir, "the checkpoint staging volume",
            "e.g. /var/lib/janus/checkpoint-staging"), ("features.cache_dir", f.cache_dir, "the feature cache",
                                                        "e.g. /var/cache/janus-features")]
    for field, path, what, example in own:
        if field == "features.cache_dir" and f.cache_size_gib == 0:
            continue
        vol = cluster_volume_of(spec, path)
        if vol is None:  # the chart mounts a volume of its own there
            clash = k8s.mount_path_problem(path, taken)
            if clash:
                problems.append(Problem(field, clash, f"choose another directory ({example}) or one on a "
                                        "cluster.volumes mount"))
            else:
                taken[path] = what
        elif vol.read_only:
            problems.append(Problem(field, f"lies on volume {vol.name}, which is mounted read-only",
                                    f"set read_only: false on volume {vol.name}, or choose another directory"))
        elif field == "cluster.checkpoint_staging_dir" and c.checkpoint_staging_storage_class:
            problems.append(Problem("cluster.checkpoint_staging_storage_class", f"has no effect: checkpoints are "
                                    f"staged on volume {vol.name} (cluster.checkpoint_staging_dir)",
                                    "remove it, or move checkpoint_staging_dir off the volume"))
    used = {n: "a volume of the chart" for n in k8s.CHART_VOLUMES}
    for i, vol in enumerate(c.volumes):
        where = f"cluster.volumes.{i}"
        if vol.name in used:
            problems.append(Problem(f"{where}.name", f"'{vol.name}' is already {used[vol.name]}",
                                    "give each volume a name of its own"))
        used.setdefault(vol.name, f"cluster.volumes {vol.name}")
        clash = k8s.mount_path_problem(vol.mount_path, taken)
        if clash:
            problems.append(Problem(f"{where}.mount_path", clash, "choose another mount path"))
        else:
            taken[vol.mount_path] = f"cluster.volumes {vol.name}"
    claims: set[str] = set()
    for i, claim in enumerate(c.resource_claims):
        if claim.name in claims:
            problems.append(Problem(f"cluster.resource_claims.{i}.name", f"'{claim.name}' is listed twice",
                                    "give each claim a name of its own"))
        claims.add(claim.name)
    return problems


# -- what the namespace admits ----------------------------------------------------------------------
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def pod_security_problems(spec: JobSpec) -> list[Problem]:
    """The spec-dependent parts of the Pod Security Standards (the chart's fixed parts meet `restricted`,
    tests/test_pod_security.py checks the rendered pods): refused when the stated level would refuse them."""
    c = spec.cluster
    problems = []
    if spec.network.preset == "hostnetwork" and c.pod_security != "privileged":
        problems.append(
            Problem(
                "cluster.pod_security",
                f"network.preset 'hostnetwork' runs the training pods in the node's network namespace "
                f"(hostNetwork), which Pod Security '{c.pod_security}' refuses",
                "label the namespace pod-security.kubernetes.io/enforce=privileged and set cluster.pod_security: "
                "privileged, or use network.preset infiniband/roce",
            )
        )
    for i, vol in enumerate(c.volumes):
        needs = {"host_path": ("privileged",), "nfs": ("baseline", "privileged")}.get(vol.kind, ())
        if needs and c.pod_security not in needs:
            problems.append(
                Problem(
                    f"cluster.volumes.{i}.{vol.kind}",
                    f"a {'hostPath' if vol.kind == 'host_path' else 'NFS'} volume is refused by Pod Security "
                    f"'{c.pod_security}'",
                    f"label the namespace pod-security.kubernetes.io/enforce={needs[0]} and set cluster.pod_security: "
                    f"{needs[0]}, or use a PersistentVolumeClaim (e.g. a local PersistentVolume for node NVMe)",
                )
            )
    if c.pod_security != "privileged":
        for key, value in c.pod_annotations.items():
            allowed = value == "runtime/default" or value.startswith("localhost/")
            if key.startswith(APPARMOR_ANNOTATION) and not allowed:
                problems.append(
                    Problem(
                        f"cluster.pod_annotations.{key}",
                        f"AppArmor profile '{value}' is refused by Pod Security '{c.pod_security}'",
                        "use runtime/default or localhost/<profile>, or remove the annotation",
                    )
                )
    return problems


STAGING_CHECKPOINTS = 3  # one being saved, one fetched for a resume, its universal (resharded) copy
VGGT_AGGREGATOR_PARAMS = 0.91e9  # the part of VGGT-1B an export carries


def export_gib(spec: JobSpec) -> float:
    """Size of one JanusVLN export: every Qwen2.5-VL weight, the spatial merger and the VGGT aggregator in
    the export dtype (17.2 GiB in bf16 for JanusVLN-7B, bench/results/export-*.json)."""
    params = (memory.QWEN_LLM_PARAMS + memory.QWEN_VISION_PARAMS + memory.QWEN_MERGER_PARAMS
              + memory.SPATIAL_MERGER_PARAMS + VGGT_AGGREGATOR_PARAMS)
    return params * (2 if spec.deepspeed.bf16 else 4) / 1024**3


def staging_problems(spec: JobSpec) -> list[Problem]:
    """The chart sizes each training pod's staging volume from cluster.checkpoint_staging_gib: a save, a
    fetched checkpoint and its resharded copy; with training.export to object storage also the export's
    output, and with export_every_checkpoint its fetched checkpoint too (it runs beside the next save).
    At the end of training the save is uploaded, so the final export's fetched checkpoint takes its place."""
    ckpt = checkpoint_gib(spec)
    need = STAGING_CHECKPOINTS * ckpt
    holds = f"a checkpoint save, a fetched checkpoint and its resharded copy ({STAGING_CHECKPOINTS} x {ckpt:.0f} GiB)"
    t = spec.training
    if t.export and t.checkpoint.url.startswith(OBJECT_STORE_SCHEMES):
        out = export_gib(spec)
        if t.export_every_checkpoint:
            need += ckpt + out
            holds += f", and an export's fetched checkpoint and output beside them ({ckpt:.0f} + {out:.0f} GiB)"
        else:
            need += out
            holds += f", and the final export's output beside them ({out:.0f} GiB)"
    need = math.ceil(need)
    if spec.cluster.checkpoint_staging_gib < need:
        return [
            Problem(
                "cluster.checkpoint_staging_gib",
                f"{spec.cluster.checkpoint_staging_gib:g} GiB cannot hold {holds}",
                f"use at least {need}",
            )
        ]
    return []


def network_problems(n: Any) -> list[Problem]:
    """NCCL's list syntax, the env passthrough and the fields that only an RDMA preset uses."""
    from janus_job.config import nccl as network

    problems = []
    if n.ib_hca is not None and (why := network.check_hca_filter(n.ib_hca)):
        problems.append(Problem("network.ib_hca", why, "see NCCL_IB_HCA in docs/network.md"))
    if n.socket_ifname is not None and (why := network.check_ifname_filter(n.socket_ifname)):
        problems.append(Problem("network.socket_ifname", why, "write interface names like 'eth0' or '=eth0,eth1'"))
    for name, what, fix in network.check_env(n.env):
        # a key that is no variable name is named by its map: the key itself may hold anything
        field = f"network.env.{name}" if network.ENV_NAME.fullmatch(name) else "network.env"
        problems.append(Problem(field, what, fix))
    if n.preset == "tcp":
        for name in ("ib_hca", "ib_gid_index", "ib_tc", "ib_sl", "gdr_level"):
            if getattr(n, name) is not None:
                problems.append(
                    Problem(
                        f"network.{name}",
                        "has no effect with network.preset 'tcp'",
                        "remove it or choose preset infiniband, roce or hostnetwork",
                    )
                )
    return problems

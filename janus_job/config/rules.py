"""Rules between fields of the job spec: each refusal names the field and the fix.

Structure (types, ranges, enums, unknown keys) is pydantic's job (janus_job.config.spec); the
DeepSpeed renderer's own refusals live beside it (janus_job.config.deepspeed).
"""

from __future__ import annotations

import math
import re
from typing import Any

from janus_job.config import k8s
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
    if f.cache_size_gib > 0:
        clash = k8s.mount_path_problem(f.cache_dir, {m: "a volume of the chart" for m in k8s.CHART_MOUNTS})
        if clash:
            problems.append(
                Problem("features.cache_dir", clash, "choose another directory, e.g. /var/cache/janus-features")
            )
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


def staging_problems(spec: JobSpec) -> list[Problem]:
    """The chart sizes each training pod's staging volume from cluster.checkpoint_staging_gib."""
    need = math.ceil(STAGING_CHECKPOINTS * checkpoint_gib(spec))
    if spec.cluster.checkpoint_staging_gib < need:
        return [
            Problem(
                "cluster.checkpoint_staging_gib",
                f"{spec.cluster.checkpoint_staging_gib:g} GiB cannot hold a checkpoint save, a fetched checkpoint and "
                f"its resharded copy ({STAGING_CHECKPOINTS} x {checkpoint_gib(spec):.0f} GiB)",
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

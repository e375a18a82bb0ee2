"""The job spec: one YAML file, validated here, that is also the Helm chart's values file.

Structure (types, ranges, enums, unknown keys) is checked by pydantic; rules that relate several
fields are plain functions (`spec_problems`, `memory_problems`) so that each refusal names the field
and the fix. The chart's `values.schema.json` and `values.yaml` are generated from `JobSpec`
(`janus-job schema [--values]`); the rules are mirrored for Helm in
`charts/janus-train/templates/_validate.tpl`, and tests/test_chart_parity.py keeps both sides equal.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from janus_job.errors import JobError

NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_LABEL_MAX = 63
IMAGE_TOKENS_PER_28PX = 28 * 28  # Qwen2.5-VL: one LLM token per 28x28 pixels after the 2x2 merge


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ImageSpec(Section):
    repository: str = Field("ghcr.io/janus-train/janus-train", min_length=1, description="Container image repository of janus-train.")
    tag: str = Field("0.1.0", min_length=1, description="Image tag (or digest suffix such as '@sha256:...').")
    pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field("IfNotPresent", description="Kubernetes imagePullPolicy.")
    pull_secrets: list[str] = Field(default_factory=list, description="Names of image pull Secrets in the job's namespace.")


class ModelSpec(Section):
    qwen: str = Field(..., min_length=1, description="Qwen2.5-VL weights: local path in the image/volume or fsspec URL (s3://...).")
    vggt: str = Field(..., min_length=1, description="VGGT-1B weights: local path or fsspec URL.")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field("sdpa", description="Attention kernel of the language model.")


class DataSpec(Section):
    annotations: str = Field(..., min_length=1, description="JanusVLN annotation file (JSON/JSONL): path or fsspec URL.")
    image_root: str = Field(..., min_length=1, description="Root the annotation image paths are relative to: path or fsspec URL.")
    allow_absolute_image_paths: bool = Field(
        False, description="Read absolute annotation image paths outside image_root as they are (else refused)."
    )
    on_bad_sample: Literal["fail", "skip"] = Field(
        "fail",
        description="A corrupt stored feature met in training is quarantined in the store; fail: the run stops "
        "naming it (a restart replaces the quarantined sample); skip: the sample is replaced and counted.",
    )
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="Stop the run when more than this fraction of samples is quarantined."
    )
    max_history_images: int = Field(8, ge=0, le=64, description="History frames per sample (JanusVLN: 8).")
    max_pixels: int = Field(576 * 28 * 28, ge=28 * 28, description="Upper pixel budget per image (Qwen2.5-VL resize).")
    min_pixels: int = Field(16 * 28 * 28, ge=28 * 28, description="Lower pixel budget per image.")
    num_workers: int = Field(8, ge=0, le=64, description="DataLoader worker processes per rank.")
    pin_memory: bool = Field(True, description="DataLoader pin_memory.")
    prefetch_factor: int = Field(2, ge=1, le=64, description="Batches prefetched per DataLoader worker.")
    persistent_workers: bool = Field(True, description="Keep DataLoader workers alive between epochs.")


class FeaturesSpec(Section):
    store: str = Field(..., min_length=1, description="Feature store root: fsspec URL (s3://bucket/prefix) or a mounted path.")
    mode: Literal["precomputed", "read_through", "online"] = Field(
        "precomputed",
        description="precomputed: the precompute Job fills the store and training waits for it; "
        "read_through: compute missing features during training and store them; online: never use the store.",
    )
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, R2...); unset for AWS S3.")
    credentials_from: Literal["secret", "environment"] = Field(
        "secret",
        description="secret: object-store credentials come from credentials_secret; "
        "environment: from the pod's identity (IRSA, Workload Identity, instance profile).",
    )
    credentials_secret: str | None = Field(
        None, description="Name of the Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (envFrom)."
    )
    cache_dir: str = Field("/var/cache/janus-features", min_length=1, description="Local feature cache: an emptyDir on the node's disk mounted here.")
    cache_size_gib: float = Field(200, ge=0, description="Size limit of the local feature cache in GiB (0: no cache volume).")
    cache_vision: bool = Field(True, description="Also cache the frozen Qwen vision tower's output (else it runs online).")


class PrecomputeSpec(Section):
    pods: int = Field(2, ge=1, le=1024, description="Pods of the precompute Indexed Job (completions = parallelism).")
    gpus_per_pod: int = Field(8, ge=1, le=16, description="GPUs per precompute pod.")
    batch_size: int = Field(8, ge=1, le=1024, description="Samples per encoder forward pass on one GPU.")
    backoff_limit_per_index: int = Field(3, ge=0, le=100, description="Retries of one failed index before it is marked failed.")


class CheckpointSpec(Section):
    url: str = Field(..., min_length=1, description="Checkpoint root: fsspec URL (s3://...) or a mounted path.")
    interval_steps: int = Field(1000, ge=1, description="Optimizer steps between checkpoints.")
    keep: int = Field(2, ge=1, le=100, description="Newest complete checkpoints kept; older ones are deleted.")


class ResizeSpec(Section):
    policy: Literal["elastic", "fixed"] = Field(
        "elastic",
        description="elastic: a job of 2+ nodes gets the PyTorchJob elasticPolicy (c10d rendezvous) and restarts at a "
        "new node count (kubectl scale / Worker replicas) within [min_nodes, max_nodes], keeping the global batch; "
        "a 1-node job runs fixed. fixed: static rendezvous at exactly training.nodes.",
    )
    min_nodes: int | None = Field(
        None, ge=1, description="Fewest nodes the job may run on (default: training.nodes; elastic jobs need >= 2: Master + 1 Worker)."
    )
    max_nodes: int | None = Field(None, ge=1, description="Most nodes the job may run on (default: training.nodes).")
    max_restarts: int = Field(10, ge=0, le=1000, description="torchrun restarts of the worker group (elastic).")


class TrainingSpec(Section):
    nodes: int = Field(1, ge=1, le=512, description="Training nodes (pods): Master 1 + Worker nodes-1.")
    gpus_per_node: int = Field(8, ge=1, le=16, description="GPUs per node = torchrun nproc_per_node.")
    micro_batch_size: int = Field(1, ge=1, le=256, description="Samples per GPU per forward/backward.")
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, le=4096, description="Micro steps per optimizer step at training.nodes (default 8, or derived from global_batch_size)."
    )
    global_batch_size: int | None = Field(
        None, ge=1, description="Samples per optimizer step, kept on resize (default: micro x accumulation x nodes x gpus)."
    )
    epochs: int = Field(1, ge=1, le=1000, description="Passes over the dataset.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2e-5, gt=0, le=1, description="Language model learning rate.")
    merger_learning_rate: float = Field(1e-5, gt=0, le=1, description="Learning rate of the vision and spatial mergers.")
    vision_learning_rate: float | None = Field(None, gt=0, le=1, description="Vision tower learning rate; unset = frozen (JanusVLN).")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps with linear warmup.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute LLM activations in backward (HF gradient checkpointing): ~25% slower steps, "
        "~20 GiB less per GPU; the fit check asks for it when a GPU cannot hold the activations.",
    )
    balanced_sampler: bool = Field(True, description="Token-balanced distributed sampler (equal work per rank).")
    seed: int = Field(42, ge=0, description="Seed of data order and initialisation.")
    log_interval: int = Field(10, ge=1, description="Optimizer steps between throughput log lines.")
    checkpoint: CheckpointSpec
    resize: ResizeSpec = Field(default_factory=ResizeSpec)
    suspend: bool = Field(False, description="Create the PyTorchJob suspended (runPolicy.suspend); unsuspend to start training.")


class Stage3Spec(Section):
    prefetch_bucket_size: int | None = Field(None, ge=0, description="zero_optimization.stage3_prefetch_bucket_size.")
    param_persistence_threshold: int | None = Field(None, ge=0, description="zero_optimization.stage3_param_persistence_threshold.")
    max_live_parameters: int | None = Field(None, ge=0, description="zero_optimization.stage3_max_live_parameters.")
    max_reuse_distance: int | None = Field(None, ge=0, description="zero_optimization.stage3_max_reuse_distance.")
    gather_16bit_weights_on_model_save: bool | None = Field(None, description="Save consolidated 16-bit weights.")


class DeepSpeedSpec(Section):
    zero_stage: int = Field(
        1, ge=0, le=3,
        description="ZeRO stage 0-3. 1: shard optimizer state, reduce gradients once per optimizer step; 2: also "
        "shard gradients (reduced at every micro-step); 3: also shard parameters.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="Keep optimizer state in host memory (CPU Adam).")
    offload_param: Literal["none", "cpu"] = Field("none", description="Keep parameters in host memory (ZeRO-3 only).")
    optimizer: Literal["deepspeed", "torch"] = Field(
        "torch",
        description="torch: the trainer passes torch AdamW (fused on CUDA; nothing to compile); deepspeed: the "
        "config's optimizer section builds AdamW (FusedAdam, or CPU Adam with optimizer offload).",
    )
    overlap_comm: bool = Field(True, description="Overlap gradient reduction with backward.")
    contiguous_gradients: bool = Field(True, description="Copy gradients into one contiguous buffer.")
    reduce_bucket_size: int = Field(500_000_000, ge=1, description="Elements per gradient reduce bucket.")
    allgather_bucket_size: int = Field(500_000_000, ge=1, description="Elements per parameter all-gather bucket (stages 1-2).")
    bf16: bool = Field(True, description="bf16 mixed precision.")
    gradient_clipping: float = Field(1.0, ge=0, description="Max gradient norm (0 disables clipping).")
    stage3: Stage3Spec = Field(default_factory=Stage3Spec, description="ZeRO-3 knobs; refused on lower stages.")
    extra_config: dict[str, Any] = Field(
        default_factory=dict, description="Raw DeepSpeed keys merged into the rendered config (checked by the same rules)."
    )


class ResourcesSpec(Section):
    cpu: str | None = Field(None, description="CPU request=limit of every GPU pod (training and precompute), e.g. '96'.")
    memory: str | None = Field(None, description="Memory request=limit of every GPU pod (training and precompute), e.g. '1500Gi'.")
    gpu_resource_name: str = Field("nvidia.com/gpu", min_length=1, description="Extended resource name of the GPUs.")
    gpu_memory_gib: float = Field(80, gt=0, description="Memory of one GPU (H100/H800: 80), used by the fit check.")


class ClusterSpec(Section):
    namespace: str | None = Field(None, description="Namespace of all objects (default: the Helm release namespace).")
    service_account: str = Field("janus-train", min_length=1, description="ServiceAccount of the pods (no API permissions needed).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of all GPU pods.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations of all GPU pods.")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Affinity of all GPU pods.")
    priority_class: str | None = Field(None, description="PriorityClass name of all GPU pods.")
    gang_scheduler: Literal["none", "volcano", "scheduler-plugins"] = Field("none", description="Gang scheduler (PyTorchJob schedulingPolicy).")
    queue: str | None = Field(None, description="Volcano queue (gang_scheduler: volcano).")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    shm_size: str = Field("64Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti)$", description="/dev/shm size (memory emptyDir) for DataLoader workers.")
    network: Literal["tcp", "infiniband", "roce", "hostnetwork"] = Field("tcp", description="NCCL network preset, see docs/deploy.md.")
    rdma_resource: str = Field("rdma/hca_shared_devices_a", min_length=1, description="RDMA device-plugin resource (infiniband/roce).")
    rdma_resource_count: int = Field(1, ge=1, le=64, description="RDMA devices requested per pod.")
    nccl_ib_hca: str | None = Field(None, description="NCCL_IB_HCA, e.g. 'mlx5' (infiniband/roce).")
    nccl_socket_ifname: str | None = Field(None, description="NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, e.g. 'eth0'.")
    roce_gid_index: int = Field(3, ge=0, le=255, description="NCCL_IB_GID_INDEX for RoCE v2.")
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations (e.g. Multus networks).")
    restart_policy: Literal["OnFailure", "ExitCode", "Never"] = Field(
        "OnFailure",
        description="Restart policy of the training replicas: OnFailure restarts a failed pod in place (the job "
        "resumes from its newest checkpoint); ExitCode restarts only on signals/exit codes >= 128.",
    )
    backoff_limit: int = Field(10, ge=0, le=1000, description="PyTorchJob runPolicy.backoffLimit (pod restarts before failure).")
    termination_grace_seconds: int = Field(
        600, ge=60, le=86400,
        description="terminationGracePeriodSeconds of the training pods: after SIGTERM the ranks finish their step, "
        "checkpoint it and upload before this runs out (torchrun waits this long minus 15 s before SIGKILL).")
    clean_pod_policy: Literal["None", "Running", "All"] = Field("None", description="PyTorchJob runPolicy.cleanPodPolicy.")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, description="Delete the finished job after this many seconds.")


class MonitorSpec(Section):
    enabled: bool = Field(True, description="Run the GPU-balance sidecar in every training pod.")
    interval_seconds: int = Field(30, ge=1, le=3600, description="Seconds between stats files and balance log lines.")
    imbalance_warning_ratio: float = Field(0.15, gt=0, le=1, description="WARN when (max-min)/max GPU memory used exceeds this.")
    stale_after_seconds: int = Field(120, ge=1, description="WARN when a rank's stats file is older than this.")
    port: int = Field(9464, ge=1024, le=65535, description="Prometheus /metrics port of the sidecar.")
    pod_monitor: bool = Field(False, description="Create a prometheus-operator PodMonitor.")


class JobSpec(Section):
    """A janus-train job: the single source of truth for validate, render, Helm and the pods."""

    model_config = ConfigDict(extra="forbid", validate_default=True, title="janus-train job spec")

    name: str = Field(..., pattern=NAME_PATTERN, max_length=DNS_LABEL_MAX, description="Job name (DNS-1035 label).")
    image: ImageSpec = Field(default_factory=ImageSpec)
    model: ModelSpec
    data: DataSpec
    features: FeaturesSpec
    precompute: PrecomputeSpec = Field(default_factory=PrecomputeSpec)
    training: TrainingSpec
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    monitor: MonitorSpec = Field(default_factory=MonitorSpec)

    # -- derived values every consumer should use instead of recomputing -------------------
    @property
    def world_size(self) -> int:
        return self.training.nodes * self.training.gpus_per_node

    @property
    def elastic(self) -> bool:
        """Whether the PyTorchJob gets an elasticPolicy: policy elastic and room for more than one node."""
        return self.training.resize.policy == "elastic" and self.max_nodes >= 2

    @property
    def min_nodes(self) -> int:
        if self.training.resize.policy == "fixed":
            return self.training.nodes
        return self.training.resize.min_nodes or self.training.nodes

    @property
    def max_nodes(self) -> int:
        if self.training.resize.policy == "fixed":
            return self.training.nodes
        return self.training.resize.max_nodes or self.training.nodes

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step; constant across resizes."""
        t = self.training
        if t.global_batch_size is not None:
            return t.global_batch_size
        return t.micro_batch_size * (t.gradient_accumulation_steps or DEFAULT_ACCUMULATION) * self.world_size

    def accumulation_for(self, world_size: int) -> int:
        """Gradient accumulation that keeps the global batch at `world_size` ranks, or JobError."""
        per_step = self.training.micro_batch_size * world_size
        if world_size < 1 or self.global_batch_size % per_step:
            raise JobError(
                f"training.global_batch_size: {self.global_batch_size} samples per step cannot be kept at "
                f"world size {world_size} with micro_batch_size {self.training.micro_batch_size} "
                f"({self.global_batch_size} is not a multiple of {per_step}). Fix: choose a global_batch_size "
                f"divisible by micro_batch_size x gpus_per_node x every node count in "
                f"[{self.min_nodes}, {self.max_nodes}], or narrow training.resize.min_nodes/max_nodes."
            )
        return self.global_batch_size // per_step


DEFAULT_ACCUMULATION = 8  # JanusVLN's train.sh
MIN_ELASTIC_NODES = 2  # Master + 1 Worker: the operator's webhook needs a Worker of >= 1 replica


# -- cross-field rules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"  - {self.path}: {self.message}\n    fix: {self.fix}"


# scheme://userinfo@host: credentials written into a URL (https://user:PASS@host, s3://key:secret@bucket)
URL_CREDENTIALS = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")
URL_FIELDS = ("model.qwen", "model.vggt", "data.annotations", "data.image_root", "features.store",
              "features.endpoint_url", "training.checkpoint.url")
PRECOMPUTE_HASH_LEN = 8  # the chart names the precompute Job <name>-precompute-<8 hex>
OBJECT_STORE_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://", "abfss://")


def _longest_generated_suffix(spec: JobSpec) -> str:
    """The longest suffix the chart and the operators append to `name` for a DNS-label name."""
    suffixes = [
        f"-worker-{max(spec.max_nodes - 2, 0)}",  # PyTorchJob pod and Service of the last worker
        "-master-0",
        f"-precompute-{'x' * PRECOMPUTE_HASH_LEN}-{spec.precompute.pods - 1}",  # Indexed Job pod hostname
        "-spec",
    ]
    return max(suffixes, key=len)


def spec_problems(spec: JobSpec) -> list[Problem]:
    """Every cross-field rule; empty when the spec is consistent."""
    problems: list[Problem] = []
    t, f, c = spec.training, spec.features, spec.cluster

    suffix = _longest_generated_suffix(spec)
    if len(spec.name) + len(suffix) > DNS_LABEL_MAX:
        problems.append(Problem(
            "name",
            f"'{spec.name}' is {len(spec.name)} characters; generated names such as '{spec.name}{suffix}' "
            f"would exceed {DNS_LABEL_MAX}",
            f"use a name of at most {DNS_LABEL_MAX - len(suffix)} characters",
        ))

    batch_problem = False
    if t.gradient_accumulation_steps is not None and t.global_batch_size is not None:
        expected = t.micro_batch_size * t.gradient_accumulation_steps * spec.world_size
        if expected != t.global_batch_size:
            batch_problem = True
            problems.append(Problem(
                "training.global_batch_size",
                f"{t.global_batch_size} disagrees with micro_batch_size x gradient_accumulation_steps x nodes x "
                f"gpus_per_node = {expected}",
                "set only one of global_batch_size and gradient_accumulation_steps (the other is derived)",
            ))
    elif t.global_batch_size is not None and t.global_batch_size % (t.micro_batch_size * spec.world_size):
        batch_problem = True
        problems.append(Problem(
            "training.global_batch_size",
            f"{t.global_batch_size} is not a multiple of micro_batch_size x nodes x gpus_per_node = "
            f"{t.micro_batch_size * spec.world_size}",
            f"use a multiple of {t.micro_batch_size * spec.world_size}",
        ))

    r = t.resize
    if r.policy == "fixed" and (r.min_nodes is not None or r.max_nodes is not None):
        problems.append(Problem(
            "training.resize.min_nodes", "min_nodes/max_nodes have no effect with policy 'fixed'",
            "set training.resize.policy: elastic, or remove min_nodes/max_nodes",
        ))
    if spec.elastic and spec.min_nodes < MIN_ELASTIC_NODES:
        problems.append(Problem(
            "training.resize.min_nodes" if r.min_nodes is not None else "training.nodes",
            f"an elastic job keeps a Master and at least one Worker (the training operator refuses 0 Worker "
            f"replicas), so it cannot run on {spec.min_nodes} node",
            "set training.resize.min_nodes (and training.nodes) >= 2, or training.resize.policy: fixed for one node",
        ))
    elif not spec.min_nodes <= t.nodes <= spec.max_nodes:
        problems.append(Problem(
            "training.nodes", f"{t.nodes} is outside training.resize [{spec.min_nodes}, {spec.max_nodes}]",
            "set min_nodes <= nodes <= max_nodes",
        ))
    elif not batch_problem:
        for nodes in range(spec.min_nodes, spec.max_nodes + 1):
            per_step = t.micro_batch_size * nodes * t.gpus_per_node
            if spec.global_batch_size % per_step:
                problems.append(Problem(
                    "training.resize",
                    f"the global batch {spec.global_batch_size} cannot be kept at {nodes} nodes "
                    f"(not a multiple of micro_batch_size x {nodes} x gpus_per_node = {per_step})",
                    "narrow training.resize.min_nodes/max_nodes, or set training.global_batch_size to a common "
                    "multiple of micro_batch_size x gpus_per_node x every allowed node count (e.g. "
                    f"{math.lcm(*(t.micro_batch_size * k * t.gpus_per_node for k in range(spec.min_nodes, spec.max_nodes + 1)))})",
                ))
                break

    if t.max_steps is None and t.warmup_ratio > 0.5:
        problems.append(Problem("training.warmup_ratio", f"{t.warmup_ratio} leaves most of training in warmup", "use a value below 0.5 (JanusVLN: 0.03)"))

    if spec.data.min_pixels > spec.data.max_pixels:
        problems.append(Problem(
            "data.min_pixels", f"{spec.data.min_pixels} is larger than data.max_pixels {spec.data.max_pixels}",
            "make min_pixels <= max_pixels (defaults 16*28*28 and 576*28*28)",
        ))
    if spec.data.num_workers == 0 and spec.data.persistent_workers:
        problems.append(Problem("data.persistent_workers", "requires data.num_workers > 0", "set persistent_workers: false or num_workers >= 1"))

    for path in URL_FIELDS:
        value: Any = spec
        for part in path.split("."):
            value = getattr(value, part)
        if isinstance(value, str) and URL_CREDENTIALS.match(value):
            problems.append(Problem(
                path, "holds credentials inside the URL (the part before '@'); they would be copied into the "
                "ConfigMap, the pods' environment and log lines (not repeated here)",
                "remove them from the URL and put them in the Secret named by features.credentials_secret "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, see manifests/s3-credentials-secret.yaml)",
            ))

    remote_store = f.store.startswith(OBJECT_STORE_SCHEMES)
    if remote_store and f.credentials_from == "secret" and not f.credentials_secret:
        problems.append(Problem(
            "features.credentials_secret",
            f"the store {f.store} needs credentials and credentials_from is 'secret', but no Secret is named",
            "create the Secret from manifests/s3-credentials-secret.yaml and set features.credentials_secret to its "
            "name, or set features.credentials_from: environment to use the pod identity (IRSA/Workload Identity)",
        ))
    if f.endpoint_url and not remote_store:
        problems.append(Problem("features.endpoint_url", f"set, but the store {f.store} is not an object-store URL", "remove endpoint_url or use an s3:// store"))
    if f.endpoint_url and not re.match(r"^https?://", f.endpoint_url):
        problems.append(Problem("features.endpoint_url", f"'{f.endpoint_url}' is not an http(s) URL", "write it like https://minio.example:9000"))
    if f.mode == "online" and f.cache_vision:
        problems.append(Problem("features.cache_vision", "has no effect in mode 'online' (nothing is read from the store)", "set cache_vision: false or mode: precomputed"))

    if c.gang_scheduler == "volcano" and not c.queue:
        problems.append(Problem("cluster.queue", "gang_scheduler 'volcano' needs a queue", "set cluster.queue (e.g. default)"))
    if c.gang_scheduler != "volcano" and c.queue:
        problems.append(Problem("cluster.queue", f"queues are a Volcano feature; gang_scheduler is '{c.gang_scheduler}'", "remove cluster.queue or set gang_scheduler: volcano"))
    if c.network == "tcp" and c.nccl_ib_hca:
        problems.append(Problem("cluster.nccl_ib_hca", "has no effect with network 'tcp'", "remove it or choose network infiniband/roce"))

    if spec.monitor.stale_after_seconds <= spec.monitor.interval_seconds:
        problems.append(Problem(
            "monitor.stale_after_seconds",
            f"{spec.monitor.stale_after_seconds} s is not longer than monitor.interval_seconds {spec.monitor.interval_seconds} s, "
            "so every rank would be reported stale",
            f"use at least 2 x interval_seconds ({2 * spec.monitor.interval_seconds})",
        ))

    problems.extend(memory_problems(spec))
    return problems


# -- does one GPU hold it? ------------------------------------------------------------------------
# Sizes of the JanusVLN model (Qwen2.5-VL-7B-Instruct + VGGT-1B), from their configs.
QWEN_LLM_PARAMS = 7.62e9  # language model incl. embeddings and untied lm_head (trainable)
QWEN_VISION_PARAMS = 0.63e9  # vision tower blocks (frozen by default)
QWEN_MERGER_PARAMS = 0.045e9  # vision merger (trainable)
SPATIAL_MERGER_PARAMS = 0.048e9  # JanusVLN's spatial merger: 8192->4096->3584 MLP (trainable)
VGGT_PARAMS = 1.26e9  # loaded only when VGGT runs online
LLM_LAYERS, LLM_HIDDEN, LLM_INTERMEDIATE, LLM_VOCAB = 28, 3584, 18944, 152064
TEXT_TOKENS = 512  # instruction + answer tokens per sample (rough)
# hidden-size and intermediate-size tensors one decoder layer keeps for backward (attention inputs,
# q/k/v, outputs, residual-side norms; the MLP's gate, up and product), janus_job.lean applied
LAYER_SAVED_HIDDEN, LAYER_SAVED_INTERMEDIATE = 7, 3
ANSWER_TOKENS = 64  # labelled (answer) tokens per sample, an upper bound for JanusVLN actions
RUNTIME_OVERHEAD_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class MemoryEstimate:
    """Rough peak memory of one GPU in GiB; the parts are printed when it does not fit."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def describe(self) -> str:
        return (f"weights {self.weights:.1f} + gradients {self.gradients:.1f} + optimizer {self.optimizer:.1f} + "
                f"activations {self.activations:.1f} + logits {self.logits:.1f} + overhead {self.overhead:.1f} "
                f"= {self.total:.1f} GiB")


def tokens_per_sample(spec: JobSpec) -> int:
    images = spec.data.max_history_images + 1
    return images * spec.data.max_pixels // IMAGE_TOKENS_PER_28PX + TEXT_TOKENS


def estimate_gpu_memory(spec: JobSpec, world_size: int | None = None) -> MemoryEstimate:
    """Upper-end estimate for the longest sample: bf16 weights/grads, fp32 optimizer state (16 bytes/param),
    ZeRO sharding over the data-parallel world, activations of the LLM, fp32 logits of the answer."""
    gib = 1024**3
    n = world_size or spec.world_size
    ds, t = spec.deepspeed, spec.training
    trainable = QWEN_LLM_PARAMS + QWEN_MERGER_PARAMS + SPATIAL_MERGER_PARAMS
    if t.vision_learning_rate is not None:
        trainable += QWEN_VISION_PARAMS
    total = QWEN_LLM_PARAMS + QWEN_MERGER_PARAMS + SPATIAL_MERGER_PARAMS
    if not spec.features.cache_vision or spec.features.mode == "online" or t.vision_learning_rate is not None:
        total += QWEN_VISION_PARAMS
    if spec.features.mode == "online":
        total += VGGT_PARAMS

    weight_bytes = 2 * total
    if ds.zero_stage == 3:
        weight_bytes /= n
    if ds.offload_param == "cpu":
        weight_bytes = 0.0
    grad_bytes = 2 * trainable / (n if ds.zero_stage >= 2 else 1)
    # fp32 master weights, Adam's two moments and the fp32 gradient partition DeepSpeed hands the
    # optimizer (measured: 87 GiB at 2 x H200 where 12 bytes/param predicted 70)
    optim_bytes = 16 * trainable / (n if ds.zero_stage >= 1 else 1)
    if ds.offload_optimizer == "cpu":
        optim_bytes = 0.0

    tokens = tokens_per_sample(spec) * t.micro_batch_size
    # bf16 values a decoder layer keeps per token for backward, with janus_job.lean's MLP and norms
    layer_bytes = (LAYER_SAVED_HIDDEN * LLM_HIDDEN + LAYER_SAVED_INTERMEDIATE * LLM_INTERMEDIATE) * 2
    if t.gradient_checkpointing:
        # one saved hidden state per layer + one layer recomputed at a time
        act_bytes = tokens * (LLM_LAYERS * LLM_HIDDEN * 2 + layer_bytes)
    else:
        act_bytes = tokens * LLM_LAYERS * layer_bytes
    # the loss runs the LM head on answer positions only (janus_job.model.restricted_lm_loss)
    logit_bytes = ANSWER_TOKENS * t.micro_batch_size * LLM_VOCAB * (2 + 4 + 4)  # bf16, fp32 upcast, fp32 grad
    return MemoryEstimate(weight_bytes / gib, grad_bytes / gib, optim_bytes / gib, act_bytes / gib,
                          logit_bytes / gib, RUNTIME_OVERHEAD_GIB)


def memory_problems(spec: JobSpec) -> list[Problem]:
    limit = spec.cluster.resources.gpu_memory_gib * 0.95
    smallest_world = spec.min_nodes * spec.training.gpus_per_node
    est = estimate_gpu_memory(spec, smallest_world)
    if est.total <= limit:
        return []
    t, ds = spec.training, spec.deepspeed
    fixes = []
    if t.micro_batch_size > 1:
        fixes.append(f"lower training.micro_batch_size (raise gradient_accumulation_steps to keep the global batch {spec.global_batch_size})")
    if not t.gradient_checkpointing:
        fixes.append("set training.gradient_checkpointing: true")
    if ds.zero_stage < 3:
        fixes.append(f"raise deepspeed.zero_stage (now {ds.zero_stage})")
    if ds.offload_optimizer == "none":
        fixes.append("set deepspeed.offload_optimizer: cpu")
    if spec.data.max_history_images > 4:
        fixes.append("lower data.max_history_images or data.max_pixels")
    return [Problem(
        "training.micro_batch_size",
        f"micro batch {t.micro_batch_size} of up to {tokens_per_sample(spec)} tokens/sample does not fit a "
        f"{spec.cluster.resources.gpu_memory_gib:g} GiB GPU at {smallest_world} ranks: estimated {est.describe()}",
        "; or ".join(fixes) or "use GPUs with more memory (cluster.resources.gpu_memory_gib)",
    )]


# -- loading ---------------------------------------------------------------------------------------


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = JobSpec
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


_FIXES = {
    "greater_than_equal": "use a value >= {ge}",
    "greater_than": "use a value > {gt}",
    "less_than_equal": "use a value <= {le}",
    "less_than": "use a value < {lt}",
    "string_too_long": "use at most {max_length} characters",
    "string_too_short": "use at least {min_length} character(s)",
    "string_pattern_mismatch": "match the pattern {pattern}",
    "literal_error": "use {expected}",
    "int_parsing": "use a whole number",
    "int_type": "use a whole number",
    "int_from_float": "use a whole number",
    "float_parsing": "use a number",
    "float_type": "use a number",
    "bool_parsing": "use true or false",
    "bool_type": "use true or false",
    "string_type": "use a string (quote it in YAML)",
    "dict_type": "use a mapping (key: value lines)",
    "model_type": "use a mapping (key: value lines)",
    "list_type": "use a list",
}


def _structural_problems(err: ValidationError) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            prefix = ".".join(str(p) for p in loc[:-1])
            fix = (f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close
                   else f"remove it; valid keys here: {', '.join(valid)}")
            problems.append(Problem(path, "unknown key", fix))
            continue
        if kind == "missing":
            field = _model_at(loc[:-1])
            desc = field.model_fields[str(loc[-1])].description if field and str(loc[-1]) in field.model_fields else None
            problems.append(Problem(path, "required but missing", f"add it ({desc})" if desc else "add it"))
            continue
        got = e.get("input")
        got_text = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        field_model = _model_at(loc[:-1])
        desc = None
        if field_model and str(loc[-1]) in field_model.model_fields:
            desc = field_model.model_fields[str(loc[-1])].description
        fix = _FIXES.get(kind, "set {path} to a valid value").format(path=path, **e.get("ctx", {}))
        if kind == "string_pattern_mismatch" and loc == ("name",):
            fix = "use lowercase letters, digits and '-', starting with a letter and not ending with '-'"
        if desc:
            fix += f" -- {desc}"
        problems.append(Problem(path, f"{e['msg']}{got_text}", fix))
    return problems


def _format(source: str, problems: list[Problem]) -> str:
    n = len(problems)
    return f"{source}: {n} problem{'s' if n != 1 else ''} in the job spec\n" + "\n".join(str(p) for p in problems)


def validate_spec(data: Any, source: str = "job spec") -> JobSpec:
    """Structure, cross-field rules and the DeepSpeed rules; JobError lists every problem."""
    if not isinstance(data, dict):
        raise JobError(f"{source}: the job spec must be a YAML mapping with keys name, model, data, features, training, ...")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        raise JobError(_format(source, _structural_problems(err))) from None
    problems = spec_problems(spec)
    from janus_job.deepspeed import deepspeed_problems  # the renderer's refusal rules

    problems.extend(deepspeed_problems(spec))
    if problems:
        raise JobError(_format(source, problems))
    return spec


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.2 floats: `2e-5` is a number (PyYAML's YAML 1.1 reads it as a string; Helm's toYaml writes it)."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_spec(path: str | Path) -> JobSpec:
    """Reads and validates a job spec YAML file (also the Helm values / the pod's ConfigMap)."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise JobError(f"{p}: no such job spec file; fix: pass the path of your job YAML (see examples/)") from None
    except OSError as err:
        raise JobError(f"{p}: cannot read the job spec ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise JobError(f"{p}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    return validate_spec(data, str(p))


def spec_to_values(spec: JobSpec) -> dict[str, Any]:
    """The Helm values of a spec: every field with defaults filled, unset optionals left out."""
    return spec.model_dump(mode="json", exclude_none=True)


def _defaults_of(model: type[BaseModel]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if field.is_required():
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out[name] = _defaults_of(ann)
            continue
        value = field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json", exclude_none=True)
        if value is not None:
            out[name] = value
    return out


def defaults_values() -> dict[str, Any]:
    """The chart's values.yaml: every default; required fields are left to the user's file."""
    return _defaults_of(JobSpec)


def json_schema() -> dict[str, Any]:
    """The chart's values.schema.json."""
    schema = JobSpec.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def chart_values_yaml() -> str:
    """The text of charts/janus-train/values.yaml (generated; a test keeps the file in sync)."""
    header = ("# Generated by `janus-job schema --values` from janus_job/spec.py: the defaults of every field.\n"
              "# Your job spec (helm install -f job.yaml) supplies name, model, data, features and\n"
              "# training.checkpoint.url; see examples/ and values.schema.json.\n")
    return header + yaml.safe_dump(defaults_values(), sort_keys=False)

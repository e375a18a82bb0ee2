"""The job spec: one YAML file, validated here, that is also the Helm chart's values file.

This module holds the sections (pydantic models: types, ranges, enums, unknown keys). Rules that
relate several fields are plain functions in janus_job.config.rules and janus_job.config.memory,
so that each refusal names the field and the fix; janus_job.config.load reads and validates a file.
The chart's `values.schema.json` and `values.yaml` are generated from `JobSpec` (janus_job.config.schema,
`janus-job schema [--values]`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine",
        description="Learning-rate schedule after warmup; the warmup is linear from 0 at optimizer step 0 "
        "(transformers' get_scheduler, as JanusVLN trains).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, le=1, description="AdamW epsilon.")
    clip_mode: Literal["sum", "mean"] = Field(
        "sum",
        description="What deepspeed.gradient_clipping bounds. sum (JanusVLN's effective behaviour: HF Trainer + "
        "DeepSpeed backward with scale_wrt_gas=False): the sum of the micro-batch mean gradients of an optimizer "
        "step, so clipping starts at 1/accumulation of the mean-gradient norm; mean: the mean over micro-batches "
        "(DeepSpeed's default), a threshold accumulation times looser.")
    export: bool = Field(
        True,
        description="At the end of training write a JanusVLN checkpoint directory (safetensors, config, VGGT, the base "
        "model's tokenizer/processor files) to <checkpoint.url>/export/step-XXXXXXXX/.")
    export_every_checkpoint: bool = Field(False, description="Also export with every checkpoint (training.export).")
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

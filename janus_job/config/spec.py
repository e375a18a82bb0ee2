"""The job spec: one YAML file, validated here, that is also the Helm chart's values file.

This module holds the sections (pydantic models: types, ranges, enums, unknown keys). Rules that
relate several fields are plain functions in janus_job.config.rules and janus_job.config.memory,
so that each refusal names the field and the fix; janus_job.config.load reads and validates a file.
The chart's `values.schema.json` and `values.yaml` are generated from `JobSpec` (janus_job.config.schema,
`janus-job schema [--values]`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from janus_job.config import k8s
from janus_job.errors import JobError

NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_LABEL_MAX = 63
IMAGE_TOKENS_PER_28PX = 28 * 28  # Qwen2.5-VL: one LLM token per 28x28 pixels after the 2x2 merge


INT32_MAX = 2**31 - 1  # Kubernetes int32 fields; also a safe bound for counts the runtime loops over
SEED_MAX = 2**32 - 1  # numpy's seed range


def _int_annotation(annotation: Any) -> bool:
    return annotation is int or (getattr(annotation, "__args__", None) or ()) == (int, type(None))


class Section(BaseModel):
    """Strict like Helm's JSON Schema: "2" is not a number, "yes" not a boolean, NaN/Inf not allowed."""

    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _whole_floats_are_ints(cls, data: Any) -> Any:
        # Helm keeps numbers as JSON numbers: its toYaml may write 500000000 as 5e+08
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                value = data.get(name)
                if isinstance(value, float) and value.is_integer() and _int_annotation(field.annotation):
                    data = {**data, name: int(value)}
        return data


class ImageSpec(Section):
    repository: k8s.ImageRepository = Field(
        "ghcr.io/janus-train/janus-train", min_length=1, description="Container image repository of janus-train."
    )
    tag: k8s.ImageTag = Field("0.1.0", min_length=1, description="Image tag (or digest suffix such as '@sha256:...').")
    pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field(
        "IfNotPresent", description="Kubernetes imagePullPolicy."
    )
    pull_secrets: Annotated[list[k8s.DNSSubdomain], k8s.unique("pull secret"), k8s.UNIQUE] = Field(
        default_factory=list, description="Names of image pull Secrets in the job's namespace."
    )


class ModelSpec(Section):
    qwen: k8s.WeightsLocation = Field(
        ..., min_length=1, description="Qwen2.5-VL weights: local path in the image/volume or fsspec URL (s3://...)."
    )
    vggt: k8s.WeightsLocation = Field(..., min_length=1, description="VGGT-1B weights: local path or fsspec URL.")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="Attention kernel of the language model."
    )


class DataSpec(Section):
    annotations: k8s.WeightsLocation = Field(
        ..., min_length=1, description="JanusVLN annotation file (JSON/JSONL): path or fsspec URL."
    )
    image_root: k8s.WeightsLocation = Field(
        ..., min_length=1, description="Root the annotation image paths are relative to: path or fsspec URL."
    )
    allow_absolute_image_paths: bool = Field(
        False, description="Read absolute annotation image paths outside image_root as they are (else refused)."
    )
    on_bad_sample: Literal["fail", "skip"] = Field(
        "fail",
        description="A missing or unreadable frame, or a corrupt stored feature (quarantined in the store); fail: "
        "the run stops naming it (a restart replaces a quarantined sample); skip: precompute leaves samples with "
        "bad frames out and training drops them, other bad samples are replaced; all are counted (bad_samples).",
    )
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="Stop the run before training when more than this fraction of samples is "
        "bad (left out for bad frames, or quarantined)."
    )
    frame_width: int = Field(
        644,
        ge=28,
        le=2044,
        multiple_of=14,
        description="Width in pixels VGGT sees each frame at (JanusVLN: 644), a multiple of the 14 px patch; "
        "taller frames are center-cropped to a square.",
    )
    max_history_images: int = Field(8, ge=0, le=64, description="History frames per sample (JanusVLN: 8).")
    max_pixels: int = Field(576 * 28 * 28, ge=28 * 28, description="Upper pixel budget per image (Qwen2.5-VL resize).")
    min_pixels: int = Field(16 * 28 * 28, ge=28 * 28, description="Lower pixel budget per image.")
    num_workers: int = Field(
        8, ge=0, le=64, description="DataLoader worker processes per rank (0: samples are read in the rank itself)."
    )
    pin_memory: bool = Field(
        True, description="Collated batches are copied to page-locked host memory (GPU only), so the copy to "
        "the GPU runs asynchronously."
    )
    prefetch_factor: int = Field(
        2, ge=1, le=64, description="Micro-batches each DataLoader worker prepares ahead (with num_workers > 0)."
    )
    persistent_workers: bool = Field(True, description="Keep DataLoader workers alive between epochs.")
    prefetch_batches: int = Field(
        2,
        ge=0,
        le=16,
        description="Micro-batches taken from the DataLoader and copied to the GPU on a side stream while the "
        "current step runs (0: each is fetched and copied when the step needs it).",
    )


class FeaturesSpec(Section):
    store: k8s.StorageLocation = Field(
        ..., min_length=1, description="Feature store root: fsspec URL (s3://bucket/prefix) or a mounted path."
    )
    mode: Literal["precomputed", "read_through", "online"] = Field(
        "precomputed",
        description="precomputed: the precompute Job fills the store and training waits for it; "
        "read_through: compute missing features during training and store them; online: never use the store.",
    )
    endpoint_url: k8s.HttpUrl | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, R2...); unset for AWS S3."
    )
    credentials_from: Literal["secret", "environment"] = Field(
        "secret",
        description="secret: object-store credentials come from credentials_secret; "
        "environment: from the pod's identity (IRSA, Workload Identity, instance profile).",
    )
    credentials_secret: k8s.DNSSubdomain | None = Field(
        None, description="Name of the Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (envFrom)."
    )
    cache_dir: k8s.AbsolutePath = Field(
        "/var/cache/janus-features",
        min_length=1,
        description="Local feature cache: an emptyDir on the node's disk mounted here.",
    )
    cache_size_gib: float = Field(
        200, ge=0, le=1_000_000, description="Size limit of the local feature cache in GiB (0: no cache volume)."
    )
    cache_vision: bool = Field(
        True, description="Also cache the frozen Qwen vision tower's output (else it runs online)."
    )


class PrecomputeSpec(Section):
    pods: int = Field(2, ge=1, le=1024, description="Pods of the precompute Indexed Job (completions = parallelism).")
    gpus_per_pod: int = Field(8, ge=1, le=16, description="GPUs per precompute pod.")
    batch_size: int = Field(8, ge=1, le=1024, description="Samples per encoder forward pass on one GPU.")
    backoff_limit_per_index: int = Field(
        3, ge=0, le=100, description="Retries of one failed index before it is marked failed."
    )


class CheckpointSpec(Section):
    url: k8s.StorageLocation = Field(..., description="Checkpoint root: fsspec URL (s3://...) or a mounted path.")
    interval_steps: int = Field(1000, ge=1, le=INT32_MAX, description="Optimizer steps between checkpoints.")
    keep: int = Field(2, ge=1, le=100, description="Newest complete checkpoints kept; older ones are deleted.")


class ResizeSpec(Section):
    policy: Literal["elastic", "fixed"] = Field(
        "elastic",
        description="elastic: a job whose max_nodes is 2+ gets the PyTorchJob elasticPolicy (c10d rendezvous), every "
        "node a Worker replica, and restarts at a new node count (kubectl scale pytorchjob/<name> --replicas <nodes>) "
        "within [min_nodes, max_nodes], keeping the global batch; a job that may only run on 1 node runs fixed. "
        "fixed: Master + Workers, static rendezvous at exactly training.nodes.",
    )
    min_nodes: int | None = Field(
        None,
        ge=1,
        description="Fewest nodes the job may run on (default: training.nodes; elastic jobs may go down to 1).",
    )
    max_nodes: int | None = Field(None, ge=1, description="Most nodes the job may run on (default: training.nodes).")
    max_restarts: int = Field(10, ge=0, le=1000, description="torchrun restarts of the worker group (elastic).")


class TrainingSpec(Section):
    nodes: int = Field(
        1, ge=1, le=512,
        description="Training nodes (pods): Worker replicas of an elastic job, else Master 1 + Worker nodes-1.")
    gpus_per_node: int = Field(8, ge=1, le=16, description="GPUs per node = torchrun nproc_per_node.")
    micro_batch_size: int = Field(1, ge=1, le=256, description="Samples per GPU per forward/backward.")
    gradient_accumulation_steps: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Micro steps per optimizer step at training.nodes (default 8, or derived from global_batch_size).",
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        le=INT32_MAX,
        description="Samples per optimizer step, kept on resize (default: micro x accumulation x nodes x gpus).",
    )
    epochs: int = Field(1, ge=1, le=1000, description="Passes over the dataset.")
    max_steps: int | None = Field(
        None, ge=1, le=INT32_MAX, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float = Field(2e-5, gt=0, le=1, description="Language model learning rate.")
    merger_learning_rate: float = Field(
        1e-5, gt=0, le=1, description="Learning rate of the vision and spatial mergers."
    )
    vision_learning_rate: float | None = Field(
        None, gt=0, le=1, description="Vision tower learning rate; unset = frozen (JanusVLN)."
    )
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
    compile: bool = Field(
        False,
        description="Compile each language-model decoder layer (torch.compile, dynamic sequence length): "
        "~17% faster forward+backward measured on one H200 at ZeRO-1, ~30 s more for the first step.",
    )
    precision: Literal["bf16", "fp8"] = Field(
        "bf16",
        description="Matmul precision of the language model's decoder linears. fp8: torchao float8 training on "
        "decoder layers 1..L-2 (embedding, LM head, mergers, first and last layer stay in deepspeed.bf16's "
        "precision); needs compute capability 8.9+ (H100/H200); pair it with training.compile. "
        "docs/performance.md has its speed and loss curves.",
    )
    fp8_recipe: Literal["tensorwise", "rowwise"] = Field(
        "tensorwise",
        description="Float8 scaling with training.precision fp8: tensorwise (one scale per tensor) or rowwise "
        "(one per row: finer, slower).",
    )
    balanced_sampler: bool = Field(True, description="Token-balanced distributed sampler (equal work per rank).")
    seed: int = Field(
        42, ge=0, le=SEED_MAX, description="Seed of data order and initialisation (numpy's range: < 2^32)."
    )
    log_interval: int = Field(10, ge=1, le=INT32_MAX, description="Optimizer steps between throughput log lines.")
    checkpoint: CheckpointSpec
    resize: ResizeSpec = Field(default_factory=ResizeSpec)
    report_to: Annotated[list[Literal["tensorboard", "wandb", "mlflow"]], k8s.UNIQUE] = Field(
        default_factory=list,
        description="Experiment trackers rank 0 reports to: tensorboard (event files under "
        "<training.checkpoint.url>/tensorboard), wandb, mlflow (extras janus-train[wandb] / [mlflow], credentials "
        "from training.tracker_secret). A tracker that cannot be reached logs a warning; training goes on.",
    )
    tracker_secret: k8s.DNSSubdomain | None = Field(
        None,
        description="Kubernetes Secret with the trackers' credentials (e.g. WANDB_API_KEY, MLFLOW_TRACKING_URI, "
        "MLFLOW_TRACKING_TOKEN), envFrom of the training pods only.",
    )
    suspend: bool = Field(
        False,
        description="Keep the PyTorchJob suspended (runPolicy.suspend), also after precompute; unsuspend by hand "
        "to start training.",
    )


class Stage3Spec(Section):
    prefetch_bucket_size: int | None = Field(
        None, ge=0, le=2**53, description="zero_optimization.stage3_prefetch_bucket_size."
    )
    param_persistence_threshold: int | None = Field(
        None, ge=0, le=2**53, description="zero_optimization.stage3_param_persistence_threshold."
    )
    max_live_parameters: int | None = Field(
        None, ge=0, le=2**53, description="zero_optimization.stage3_max_live_parameters."
    )
    max_reuse_distance: int | None = Field(
        None, ge=0, le=2**53, description="zero_optimization.stage3_max_reuse_distance."
    )
    gather_16bit_weights_on_model_save: bool | None = Field(None, description="Save consolidated 16-bit weights.")


class DeepSpeedSpec(Section):
    zero_stage: int = Field(
        1,
        ge=0,
        le=3,
        description="ZeRO stage 0-3. 1: shard optimizer state, reduce gradients once per optimizer step; 2: also "
        "shard gradients (reduced at every micro-step); 3: also shard parameters.",
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="Keep optimizer state in host memory (CPU Adam)."
    )
    offload_param: Literal["none", "cpu"] = Field("none", description="Keep parameters in host memory (ZeRO-3 only).")
    optimizer: Literal["deepspeed", "torch"] = Field(
        "torch",
        description="torch: the trainer passes torch AdamW (fused on CUDA; nothing to compile); deepspeed: the "
        "config's optimizer section builds AdamW (FusedAdam, or CPU Adam with optimizer offload).",
    )
    overlap_comm: bool = Field(True, description="Overlap gradient reduction with backward.")
    contiguous_gradients: bool = Field(True, description="Copy gradients into one contiguous buffer.")
    reduce_bucket_size: int = Field(500_000_000, ge=1, le=2**53, description="Elements per gradient reduce bucket.")
    allgather_bucket_size: int = Field(
        500_000_000, ge=1, le=2**53, description="Elements per parameter all-gather bucket (stages 1-2)."
    )
    bf16: bool = Field(True, description="bf16 mixed precision.")
    gradient_clipping: float = Field(1.0, ge=0, le=1e6, description="Max gradient norm (0 disables clipping).")
    stage3: Stage3Spec = Field(default_factory=Stage3Spec, description="ZeRO-3 knobs; refused on lower stages.")
    extra_config: k8s.ConfigTree = Field(
        default_factory=dict,
        description="Raw DeepSpeed keys merged into the rendered config (checked by the same rules).",
    )


class ResourcesSpec(Section):
    cpu: k8s.Quantity = Field(
        "96",
        min_length=1,
        description="CPU request=limit of every GPU pod (training and precompute). The default fits an 8-GPU "
        "H100/H800 node (2 x 48+ cores): 8 ranks, their DataLoader workers and CPU Adam threads.",
    )
    memory: k8s.Quantity = Field(
        "900Gi",
        min_length=1,
        description="Memory request=limit of every GPU pod, /dev/shm included. The default fits the allocatable "
        "memory of a 1 TiB 8-GPU node; raise it for optimizer/parameter offload (e.g. '1500Gi' on 2 TiB nodes).",
    )
    gpu_resource_name: k8s.ExtendedResourceName = Field(
        "nvidia.com/gpu", min_length=1, description="Extended resource name of the GPUs."
    )
    gpu_memory_gib: float = Field(
        80, gt=0, le=1_000_000, description="Memory of one GPU (H100/H800: 80), used by the fit check."
    )


class PvcSource(Section):
    claim_name: k8s.DNSSubdomain = Field(..., description="Name of a PersistentVolumeClaim in the job's namespace.")


class NfsSource(Section):
    server: k8s.Host = Field(..., description="NFS server: host name or IP address.")
    path: k8s.AbsolutePath = Field(..., description="Exported path on the server.")


class HostPathSource(Section):
    path: k8s.AbsolutePath = Field(
        ..., description="Directory on the node (e.g. a local NVMe mount), writable by uid/gid 1000.")
    type: Literal["Directory", "DirectoryOrCreate"] = Field(
        "Directory", description="Directory: must exist on the node; DirectoryOrCreate: created (owned by root).")


class ExtraVolume(Section):
    """A volume mounted into the main container of every GPU pod (training and precompute)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["pvc"]}, {"required": ["nfs"]}, {"required": ["host_path"]}]})

    name: k8s.DNSLabel = Field(..., description="Volume name (DNS-1123 label), unique in the pod.")
    mount_path: k8s.AbsolutePath = Field(
        ..., description="Where the containers see it; features.cache_dir and cluster.checkpoint_staging_dir may "
        "lie on it.")
    read_only: bool = Field(False, description="Mount read-only (datasets, weights).")
    pvc: PvcSource | None = Field(None, description="A PersistentVolumeClaim (Pod Security: any level).")
    nfs: NfsSource | None = Field(None, description="An NFS export (Pod Security: baseline or privileged).")
    host_path: HostPathSource | None = Field(
        None, description="A directory of the node, e.g. node-local NVMe (Pod Security: privileged only).")

    @model_validator(mode="after")
    def _one_source(self) -> ExtraVolume:
        sources = [n for n in ("pvc", "nfs", "host_path") if getattr(self, n) is not None]
        if len(sources) != 1:
            raise k8s.grammar_error(f"volume {self.name!r} has {' and '.join(sources) or 'no source'}",
                                    "give exactly one of pvc, nfs or host_path")
        return self

    @property
    def kind(self) -> str:
        return next(n for n in ("pvc", "nfs", "host_path") if getattr(self, n) is not None)


class EnvVar(Section):
    name: k8s.EnvVarName = Field(..., description="Variable name.")
    value: k8s.PrintableText = Field("", description="Value (one line).")


class ResourceClaim(Section):
    name: k8s.DNSLabel = Field(..., description="Claim name in the pod (DNS-1123 label), unique.")
    resource_claim_template_name: k8s.DNSSubdomain = Field(
        ..., description="ResourceClaimTemplate in the job's namespace: each training pod gets its own claim from it.")


class KueueTopology(Section):
    mode: Literal["required", "preferred"] = Field(
        "required",
        description="required: Kueue admits the job only where all its pods fit in one domain of level; preferred: "
        "as few domains as it can.")
    level: k8s.LabelKey = Field(
        ..., description="Node label of the topology level of Kueue's Topology (e.g. cloud.example.com/topology-block, "
        "kubernetes.io/hostname).")


class RdmaResource(Section):
    name: k8s.ExtendedResourceName = Field(
        ..., description="Extended resource of the RDMA device plugin or SR-IOV network (e.g. "
        "rdma/rdma_shared_device_a, nvidia.com/roce_rail_0).")
    count: int = Field(1, ge=1, le=1024, description="Devices of it per training pod.")


class ClusterSpec(Section):
    namespace: k8s.DNSLabel | None = Field(
        None, description="Namespace of all objects (default: the Helm release namespace)."
    )
    service_account: k8s.DNSSubdomain = Field(
        "janus-train", min_length=1, description="ServiceAccount of the pods (no API permissions needed)."
    )
    node_selector: k8s.NodeSelector = Field(default_factory=dict, description="nodeSelector of all GPU pods.")
    tolerations: list[k8s.Toleration] = Field(default_factory=list, description="Tolerations of all GPU pods.")
    affinity: k8s.Affinity = Field(
        default_factory=k8s.Affinity, description="Affinity of all GPU pods (Kubernetes API fields)."
    )
    priority_class: k8s.PriorityClassName | None = Field(None, description="PriorityClass name of all GPU pods.")
    gang_scheduler: Literal["none", "volcano", "scheduler-plugins"] = Field(
        "none", description="Gang scheduler (PyTorchJob schedulingPolicy)."
    )
    queue: k8s.DNSLabel | None = Field(None, description="Volcano queue (gang_scheduler: volcano).")
    kueue_queue: str | None = Field(
        None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Kueue LocalQueue of the training job (label kueue.x-k8s.io/queue-name): Kueue admits it and owns "
        "runPolicy.suspend; with features.mode precomputed the starter adds the label once precompute has succeeded.",
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    shm_size: str = Field(
        "64Gi",
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti)$",
        description="/dev/shm size (memory emptyDir) for DataLoader workers.",
    )
    rdma_resources: list[RdmaResource] = Field(
        default_factory=lambda: [RdmaResource(name="rdma/hca_shared_devices_a", count=1)],
        description="RDMA device-plugin resources of each training pod, added to requests = limits (network presets "
        "other than tcp): the shared HCA resource, or one SR-IOV VF resource per rail; [] when the network "
        "attachment injects them. A list, not a map: Helm would merge a map with this default.",
    )
    pod_annotations: k8s.Annotations = Field(
        default_factory=dict,
        description="Extra annotations of the GPU pods (e.g. k8s.v1.cni.cncf.io/networks for Multus: training pods "
        "only, precompute pods request no RDMA device to attach).",
    )
    pod_labels: dict[k8s.LabelKey, k8s.LabelValue] = Field(
        default_factory=dict,
        description="Extra labels of the GPU pods (keys of app.kubernetes.io/, janus-train.io/, kueue.x-k8s.io/ and "
        "training.kubeflow.org/ are the chart's, Kueue's and the operator's).",
    )
    scheduler_name: k8s.DNSSubdomain | None = Field(
        None, description="schedulerName of the GPU pods (default: the cluster's; gang_scheduler sets its own)."
    )
    runtime_class_name: k8s.DNSSubdomain | None = Field(
        None, description="runtimeClassName of the GPU pods (e.g. nvidia, where the GPU runtime is not the default)."
    )
    kueue_topology: KueueTopology | None = Field(
        None,
        description="Kueue topology-aware scheduling of the training pods (annotation "
        "kueue.x-k8s.io/podset-<mode>-topology: <level>); needs cluster.kueue_queue.",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        description="Extra environment variables of the GPU containers (NCCL's go in network.env; names janus-train, "
        "torchrun or the operator set are refused).",
    )
    volumes: list[ExtraVolume] = Field(
        default_factory=list,
        description="Extra volumes (PVC, NFS, hostPath) mounted in every GPU pod: datasets, weights, node-local NVMe "
        "for features.cache_dir or cluster.checkpoint_staging_dir.",
    )
    resource_claims: list[ResourceClaim] = Field(
        default_factory=list,
        description="Dynamic Resource Allocation claims of each training pod (pod resourceClaims, claimed by the "
        "pytorch container).",
    )
    restart_policy: Literal["OnFailure", "ExitCode", "Never"] = Field(
        "OnFailure",
        description="Restart policy of the training replicas: OnFailure restarts a failed pod in place (the job "
        "resumes from its newest checkpoint); ExitCode restarts only on signals/exit codes >= 128.",
    )
    backoff_limit_per_node: int = Field(
        10,
        ge=0,
        le=1000,
        description="Container restarts allowed per node before the PyTorchJob fails: runPolicy.backoffLimit is this "
        "x the most nodes the job may run on (the operator counts every restart, the sidecar's included).",
    )
    termination_grace_seconds: int = Field(
        600,
        ge=60,
        le=86400,
        description="terminationGracePeriodSeconds of the training pods: after SIGTERM the ranks finish their step, "
        "checkpoint it and upload before this runs out (torchrun waits this long minus 15 s before SIGKILL).",
    )
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "None", description="PyTorchJob runPolicy.cleanPodPolicy."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, le=INT32_MAX, description="Delete the finished job after this many seconds."
    )
    pod_security: Literal["restricted", "baseline", "privileged"] = Field(
        "restricted",
        description="Pod Security Standards level the namespace enforces (label pod-security.kubernetes.io/enforce; "
        "manifests/namespace.yaml: restricted). validate refuses a spec whose pods that level would refuse; the "
        "hostnetwork preset needs privileged.",
    )
    checkpoint_staging_gib: float = Field(
        400,
        gt=0,
        le=100_000,
        description="Node-local checkpoint staging of each training pod (JANUS_CHECKPOINT_STAGING): a save, a fetched "
        "checkpoint and its resharded copy; at least 3 x the estimated checkpoint (JanusVLN-7B: 101-109 GiB), plus "
        "the export's output (17 GiB in bf16) with training.export to object storage, plus one more checkpoint "
        "with export_every_checkpoint (the export fetches its checkpoint here).",
    )
    checkpoint_staging_dir: k8s.AbsolutePath = Field(
        "/var/lib/janus/checkpoint-staging",
        description="Where training pods stage checkpoints (JANUS_CHECKPOINT_STAGING): the chart's staging volume is "
        "mounted here, unless the directory lies on a cluster.volumes mount (e.g. node-local NVMe), which then "
        "holds it.",
    )
    checkpoint_staging_storage_class: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$",
        description="Stage checkpoints on a per-pod generic ephemeral volume of this StorageClass "
        "(checkpoint_staging_gib) instead of an emptyDir on the node's disk.",
    )


class NetworkSpec(Section):
    """NCCL's network: janus-job launch sets the variables (janus_job/deploy/network.py), checks the node and
    the transport NCCL actually uses at start; docs/network.md."""

    preset: Literal["tcp", "infiniband", "roce", "hostnetwork"] = Field(
        "tcp",
        description="tcp: sockets only; infiniband/roce: NCCL's IB transport over the RDMA device plugin's "
        "HCAs; hostnetwork: the node's network namespace (RDMA devices of the host).",
    )
    ib_hca: k8s.Token | None = Field(
        None,
        description="NCCL_IB_HCA in NCCL's syntax, exact or excluding: '=mlx5_0,mlx5_1', '=mlx5_0:1', "
        "'^=mlx5_bond_0' (unset: NCCL uses every ACTIVE HCA port).",
    )
    socket_ifname: k8s.Token | None = Field(
        None,
        description="NCCL_SOCKET_IFNAME in NCCL's syntax ('eth0', '=eth0,eth1', '^docker,lo'); a list "
        "without '^' also becomes GLOO_SOCKET_IFNAME.",
    )
    ib_gid_index: int | None = Field(
        None, ge=0, le=255, description="NCCL_IB_GID_INDEX (unset: NCCL picks the RoCE v2 GID)."
    )
    ib_tc: int | None = Field(
        None, ge=0, le=255, description="NCCL_IB_TC, the traffic class of NCCL's IB/RoCE traffic."
    )
    ib_sl: int | None = Field(None, ge=0, le=15, description="NCCL_IB_SL, the InfiniBand service level.")
    gdr_level: Literal["LOC", "PIX", "PXB", "PHB", "SYS"] | None = Field(
        None, description="NCCL_NET_GDR_LEVEL (unset: NCCL decides from the PCI topology)."
    )
    check: Literal["error", "warn", "off"] = Field(
        "error",
        description="What a missing RDMA prerequisite, a socket fallback under an RDMA preset or a bus "
        "bandwidth below min_busbw_gbs does at start: fail the job, log a warning, or skip the check.",
    )
    min_busbw_gbs: float | None = Field(
        None,
        gt=0,
        description="Expected all-reduce bus bandwidth (GB/s, nccl-tests' busbw) of a multi-node job "
        "(unset: 40 for the RDMA presets, none for tcp).",
    )
    env: dict[k8s.EnvVarName, k8s.PrintableText] = Field(
        default_factory=dict,
        description="Further variables for NCCL or its plugins (e.g. NCCL_IB_TIMEOUT: '22'); "
        "names janus-train sets itself are refused.",
    )


class MonitorSpec(Section):
    enabled: bool = Field(True, description="Run the GPU-balance sidecar in every training pod.")
    interval_seconds: int = Field(30, ge=1, le=3600, description="Seconds between stats files and balance log lines.")
    imbalance_warning_ratio: float = Field(
        0.15, gt=0, le=1, description="WARN when (max-min)/max GPU memory used exceeds this."
    )
    stale_after_seconds: int = Field(
        120, ge=1, le=86400, description="WARN when a rank's stats file is older than this."
    )
    port: int = Field(9464, ge=1024, le=65535, description="Prometheus /metrics port of the sidecar.")
    pod_monitor: bool = Field(False, description="Create a prometheus-operator PodMonitor.")
    dashboard: bool = Field(
        False, description="Create a ConfigMap with the job's Grafana dashboard, labelled grafana_dashboard: '1' for "
        "Grafana's dashboard sidecar."
    )
    scraper_namespace: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="Namespace of the Prometheus that scrapes /metrics: the NetworkPolicy admits only it to the "
        "metrics port (unset: any pod in the cluster).",
    )


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
    network: NetworkSpec = Field(default_factory=NetworkSpec)
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

"""The training loop: one rank of a janus-train job on the DeepSpeed engine, and its log line.

`janus-job train --spec job.yaml` (or `python -m janus_job.train --spec job.yaml`) runs one rank;
torchrun (started by `janus-job launch`) runs one per GPU. Without torchrun's variables it runs
as a single-process job (the demo).

Order of a run: spec -> process group -> (precomputed mode) wait for the store's completion
marker, then refuse to start if any sample lacks features -> dataset, balanced sampler, model ->
`deepspeed.initialize` with the rendered config -> resume from the newest checkpoint -> loop.
Each optimizer step trains one global batch (see janus_job.sampler); every
`training.log_interval` steps every node's first rank prints one line

    train step=120/5000 s/it=3.02 samples/s=10.6 tokens/s=40.1k mfu=38.2% data_wait=1.2%
    mem_peak=61.3GiB mem_min=58.0GiB mem_max=63.1GiB loss=1.234 lr=1.9e-05 eta=4h05m

and appends the same fields as one JSON object to the metrics file (JANUS_METRICS_FILE, or
$JANUS_STATS_DIR/train-metrics-rank<r>.jsonl). docs/training.md defines every field.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from janus_job.errors import JobError

METRICS_FILE_ENV = "JANUS_METRICS_FILE"
SAMPLE_TRACE_ENV = "JANUS_SAMPLE_TRACE"  # per-rank JSON lines of the sample ids trained, for resume checks
PEAK_TFLOPS_ENV = "JANUS_PEAK_TFLOPS"  # per-device peak for MFU where the card is not in the table
PRECOMPUTE_WAIT_ENV = "JANUS_PRECOMPUTE_WAIT_S"
TINY_ENCODERS_ENV = "JANUS_TINY_ENCODERS"  # read_through with the seeded tiny encoders (tests, demo)
DEFAULT_PRECOMPUTE_WAIT_S = 48 * 3600.0
FRAME_SPOT_CHECK = 64  # frames re-hashed at start against the store's frame index
GIB = 1024**3

# Dense bf16 tensor-core peak per device (vendor data sheets), matched against the CUDA name.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("H800", 989.4),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("B200", 2250.0),
)


# ---------------------------------------------------------------- the FLOP model


@dataclass
class ParamCounts:
    """Parameter counts the FLOP model needs (ZeRO-3 partitioned parameters count fully)."""

    llm_body: int  # language model without the input embedding table (a lookup, no matmul)
    lm_head: int
    mergers: int  # vision merger + spatial merger (trainable)
    vision_blocks: int  # frozen Qwen vision tower blocks (run only when pixels come in)
    vggt: int  # frozen VGGT aggregator (run only when frames come in)

    @classmethod
    def of(cls, model: Any) -> "ParamCounts":
        def count(module: Any) -> int:
            if module is None:
                return 0
            return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())

        language = model.model.language_model
        visual = model.model.visual
        return cls(
            llm_body=count(language) - count(language.get_input_embeddings()),
            lm_head=count(model.lm_head),
            mergers=count(visual.merger) + count(getattr(model, "merger", None)),
            vision_blocks=count(visual) - count(visual.merger),
            vggt=count(getattr(model, "vggt", None)),
        )


@dataclass
class BatchWork:
    """Token counts of the micro-batches of one interval, summed."""

    samples: int = 0
    tokens: int = 0  # non-padding LLM positions
    label_tokens: int = 0
    image_tokens: int = 0  # LLM positions holding image embeddings (merger outputs)
    spatial_tokens: int = 0  # spatial-merger outputs: one map per sample
    vision_patches: int = 0  # patches through the vision tower when it runs online
    vggt_patches: int = 0  # frame patches through VGGT when it runs online
    bad_samples: int = 0  # samples replaced because their stored features are corrupt (data.on_bad_sample)

    def add_batch(self, batch: dict, image_token_id: int) -> None:
        mask = batch["attention_mask"]
        self.samples += int(mask.shape[0])
        self.tokens += int(mask.sum())
        self.label_tokens += int((batch["labels"] != -100).sum())
        self.image_tokens += int((batch["input_ids"] == image_token_id).sum())
        grid = batch["image_grid_thw"]
        per_image = grid.prod(-1) // 4  # 2x2 merge
        first_image = 0
        for count in batch["images_per_sample"].tolist():
            if count:
                self.spatial_tokens += int(per_image[first_image + count - 1])
            first_image += count
        if "pixel_values" in batch:
            self.vision_patches += int(grid.prod(-1).sum())
        for frames in batch.get("vggt_frames") or []:
            s, _, h, w = frames.shape
            self.vggt_patches += int(s * (h // 14) * (w // 14))
        self.bad_samples += len(batch.get("bad_samples") or ())

    def as_list(self) -> list[int]:
        return [self.samples, self.tokens, self.label_tokens, self.image_tokens, self.spatial_tokens,
                self.vision_patches, self.vggt_patches, self.bad_samples]

    @classmethod
    def from_list(cls, values: list[float]) -> "BatchWork":
        return cls(*(int(v) for v in values))


def model_flops(work: BatchWork, params: ParamCounts) -> float:
    """Model FLOPs of `work` (the 6PT convention; docs/training.md "FLOP model").

    Trained matmuls cost 6 FLOPs per parameter per token (2 forward, 4 backward): the LLM body on
    every token, the LM head only on label tokens (the loss is computed there only), the mergers
    on their output tokens. Frozen encoders running online cost 2 per parameter per patch
    (forward only). Attention scores and recomputation by gradient checkpointing are not counted.
    """
    return (
        6.0 * params.llm_body * work.tokens
        + 6.0 * params.lm_head * work.label_tokens
        + 6.0 * params.mergers * (work.image_tokens + work.spatial_tokens) / 2
        + 2.0 * params.vision_blocks * work.vision_patches
        + 2.0 * params.vggt * work.vggt_patches
    )


def peak_flops_per_device(device_name: str | None, env: dict | None = None) -> float | None:
    env = os.environ if env is None else env
    if env.get(PEAK_TFLOPS_ENV):
        return float(env[PEAK_TFLOPS_ENV]) * 1e12
    if not device_name:
        return None
    for marker, tflops in PEAK_BF16_TFLOPS:
        if marker in device_name:
            return tflops * 1e12
    return None


# ---------------------------------------------------------------- schedule


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of every group's base lr at optimizer step `step` (0-based): linear warmup from
    1/(warmup+1), then cosine to 0, linear to 0, or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise JobError(f"training.scheduler {kind!r} is not cosine, linear or constant")


# ---------------------------------------------------------------- log line


def _si(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.1f}"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}GiB"


def format_log_line(record: dict) -> str:
    """The greppable text form of one metrics record (the JSON line has the same fields)."""
    return (
        f"train step={record['step']}/{record['total_steps']} s/it={record['s_per_it']:.2f} "
        f"samples/s={record['samples_per_s']:.3g} tokens/s={_si(record['tokens_per_s'])} "
        f"mfu={_pct(record['mfu'])} data_wait={_pct(record['data_wait'])} "
        f"mem_peak={_gib(record['mem_peak_gib'])} mem_min={_gib(record['mem_min_gib'])} "
        f"mem_max={_gib(record['mem_max_gib'])} loss={record['loss']:.4f} lr={record['lr']:.2e} "
        f"eta={_duration(record['eta_s'])}"
    ) + (f" bad_samples={record['bad_samples']}" if record.get("bad_samples") else "")


class MetricsFile:
    """Appends one JSON object per line; each line is a single write() on an O_APPEND file."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.path:
            return
        line = (json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def _per_rank_path(template: str | None, rank: int) -> str | None:
    if not template:
        return None
    if "{rank}" in template:
        return template.replace("{rank}", str(rank))
    return template if rank == 0 else f"{template}.rank{rank}"


def metrics_path(rank: int, env: dict | None = None) -> str | None:
    env = os.environ if env is None else env
    if env.get(METRICS_FILE_ENV):
        return _per_rank_path(env[METRICS_FILE_ENV], rank)
    if env.get("JANUS_STATS_DIR"):
        return os.path.join(env["JANUS_STATS_DIR"], f"train-metrics-rank{rank}.jsonl")
    return None


# ---------------------------------------------------------------- process group


@dataclass
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def prints(self) -> bool:
        """The first rank of every node prints (each pod's `kubectl logs` shows the line)."""
        return self.local_rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[Ranks, Any]:
    """Joins the process group torchrun describes (or makes a one-rank group); returns the device."""
    import torch

    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    ranks = Ranks(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
        device, backend = torch.device("cuda", ranks.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(1, ranks.local_world_size)))
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    return ranks, device


def _same_on_all_ranks(value: Any) -> Any:
    """Rank 0's `value`, on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_everywhere(problem: str | None) -> None:
    """Every rank raises the same JobError (so no rank waits forever in a collective)."""
    problem = _same_on_all_ranks(problem)
    if problem:
        raise JobError(problem)


# ---------------------------------------------------------------- data


def _wait_seconds(env: dict | None = None) -> float:
    env = os.environ if env is None else env
    raw = env.get(PRECOMPUTE_WAIT_ENV)
    if not raw:
        return DEFAULT_PRECOMPUTE_WAIT_S
    try:
        return float(raw)
    except ValueError:
        raise JobError(f"{PRECOMPUTE_WAIT_ENV}={raw!r} is not a number of seconds") from None


def _fill_store(spec: Any, annotations: Any, ranks: Ranks, device: Any) -> None:
    """read_through: the job computes what the store lacks itself, sharded over its ranks (rank r
    is precompute worker r of world_size, skipping what exists), then trains from the store."""
    import io

    import torch

    from janus_job.precompute import finalize, load_encoders, run_worker, tiny_encoders

    if os.environ.get(TINY_ENCODERS_ENV) == "1":
        encoders = tiny_encoders(str(device), vision=spec.features.cache_vision)
    else:
        encoders = load_encoders(spec, str(device))
    run_worker(spec, encoders, worker=ranks.rank, workers=ranks.world_size, annotations=annotations,
               progress_interval_s=60.0)
    fingerprints = encoders.fingerprints()
    del encoders
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if ranks.rank != 0:
        return
    deadline = time.monotonic() + _wait_seconds()
    while finalize(spec, fingerprints, ranks.world_size, annotations=annotations, stream=io.StringIO()) is None:
        if time.monotonic() > deadline:
            raise JobError(f"read_through: not every rank finished filling {spec.features.store} within "
                           f"{_wait_seconds():.0f}s ({PRECOMPUTE_WAIT_ENV})")
        time.sleep(2.0)


def _open_completed_store(spec: Any, annotations: Any, poll_s: float) -> Any:
    """The feature store, once precompute has marked these annotations complete, opened with the
    fingerprints that precompute recorded (so features of other weights/geometry are refused)."""
    from janus_job.store import FeatureStore, Fingerprint

    store = FeatureStore.from_spec(spec)
    completion = store.wait_complete(annotations.digest, _wait_seconds(), poll_s=poll_s)
    recorded = completion.get("fingerprints", {})
    kinds = ["spatial"] + (["vision"] if spec.features.cache_vision else [])
    fingerprints = []
    for kind in kinds:
        if kind not in recorded:
            raise JobError(
                f"features.store {store.url} was precomputed without {kind} features; rerun `janus-job precompute` "
                f"with this spec (features.cache_vision: {str(spec.features.cache_vision).lower()})"
            )
        manifest = store.manifest(kind)
        if manifest is None:
            raise JobError(f"features.store {store.url}: manifest-{kind}.json is missing; rerun `janus-job precompute`")
        fingerprint = Fingerprint(manifest["kind"], manifest["fields"])
        if fingerprint.id != recorded[kind]:
            raise JobError(
                f"features.store {store.url}: the {kind} manifest changed after precompute completed "
                f"({fingerprint.id} != {recorded[kind]}); rerun `janus-job precompute`"
            )
        fingerprints.append(fingerprint)
    store.open(fingerprints, create=False)
    return store, {fp.kind: fp for fp in fingerprints}


@dataclass
class Features:
    """Where this run's encoder outputs come from."""

    source: Any  # a janus_job.data.FeatureSource, or None when both encoders run online
    spatial: str  # "cached" | "online"
    vision: str  # "cached" | "online"
    target_width: int | None = None  # frame width the cached features were computed at
    spatial_channels: int | None = None  # channels of the cached spatial maps


def _feature_source(spec: Any, annotations: Any, ranks: Ranks, device: Any) -> Features:
    """The features for the spec's features.mode; cached ones fix the frame width (frames read
    online must match it) and the spatial merger's input channels."""
    from janus_job.store import StoreFeatureSource

    mode = spec.features.mode
    if mode == "online":
        return Features(None, "online", "online")
    if mode == "read_through":
        _fill_store(spec, annotations, ranks, device)
    poll_s = 2.0 if mode == "read_through" else 30.0  # read_through: rank 0 finalizes within seconds
    store, fingerprints = _open_completed_store(spec, annotations, poll_s)
    spatial_fingerprint = fingerprints["spatial"]
    problem = None
    frame_hashes: dict = {}
    if ranks.rank == 0:
        try:
            _check_spatial_weights(spec, spatial_fingerprint)
            if "vision" in fingerprints:
                _check_vision_weights(spec, fingerprints["vision"])
            frame_hashes = store.completed_frame_index(annotations.digest, frame_paths=annotations.image_paths(),
                                                       spot_check=FRAME_SPOT_CHECK)
            missing = store.missing(annotations.samples, frame_hashes, vision=spec.features.cache_vision)
        except JobError as err:  # other ranks are already waiting for rank 0's verdict
            missing, problem = [], str(err)
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            problem = (
                f"features.store {store.url}: {len(missing)} of {len(annotations.samples)} samples have no "
                f"precomputed features (first: {shown}); the store is incomplete for these annotations: rerun "
                f"`janus-job precompute --spec ...` (it computes only what is missing), or use features.mode: online"
            )
    _raise_everywhere(problem)
    frame_hashes = _same_on_all_ranks(frame_hashes)
    source = StoreFeatureSource(store, frame_hashes=frame_hashes, image_root=spec.data.image_root,
                                vision=bool(spec.features.cache_vision))
    return Features(
        source,
        "cached",
        "cached" if spec.features.cache_vision else "online",
        target_width=int(spatial_fingerprint.fields["target_width"]),
        spatial_channels=2 * int(spatial_fingerprint.fields["architecture"]["embed_dim"]),
    )


def _check_spatial_weights(spec: Any, fingerprint: Any) -> None:
    """The cached spatial features must come from the VGGT weights this spec names: a store
    precomputed with other weights (same geometry) is refused, never silently trained on."""
    import torch

    from janus_job.store import state_dict_digest
    from janus_job.vggt import VGGTAggregatorConfig, load_aggregator

    config = VGGTAggregatorConfig(**fingerprint.fields["architecture"])
    aggregator = load_aggregator(spec.model.vggt, config, "cpu", torch.float32)
    found = state_dict_digest(aggregator.state_dict())
    if found != fingerprint.fields["weights_sha256"]:
        raise JobError(
            f"model.vggt: {spec.model.vggt} is not the VGGT checkpoint features.store was precomputed with "
            f"(weights sha256 {found[:12]} != {str(fingerprint.fields['weights_sha256'])[:12]}); point "
            "model.vggt at the weights the store was built from, or give this run its own features.store "
            "and rerun `janus-job precompute`"
        )


def _check_vision_weights(spec: Any, fingerprint: Any) -> None:
    """Cached vision-tower features must come from the vision tower of model.qwen."""
    from janus_job.precompute import frozen_visual_digest, read_qwen_visual

    found = frozen_visual_digest(read_qwen_visual(spec.model.qwen)[0])
    if found != fingerprint.fields["weights_sha256"]:
        raise JobError(
            f"model.qwen: the vision tower of {spec.model.qwen} is not the one features.store was precomputed "
            f"with (weights sha256 {found[:12]} != {str(fingerprint.fields['weights_sha256'])[:12]}); point "
            "model.qwen at the checkpoint the store was built from, or give this run its own features.store "
            "and rerun `janus-job precompute`"
        )


def _reraise_loader_error(err: JobError) -> None:
    """A JobError raised in a DataLoader worker arrives with the worker's traceback inside its
    message; keep the user's part (it names the sample)."""
    text = str(err)
    marker = "JobError: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].strip()
    raise JobError(text) from None


def to_device(batch: dict, device: Any) -> dict:
    """The batch's tensors (and lists of tensors) on `device`, copied without blocking."""
    import torch

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            return [v.to(device, non_blocking=True) for v in value]
        return value

    return {key: move(value) for key, value in batch.items()}


# ---------------------------------------------------------------- the run


@dataclass
class Interval:
    """What one rank measured since the last log line."""

    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    data_wait_s: float = 0.0
    loss_sum: Any = 0.0  # a device tensor once a step ran: no host sync per micro-step
    loss_count: int = 0
    lr: float = 0.0
    work: BatchWork = field(default_factory=BatchWork)


class Trainer:
    """One rank's training run; `run()` trains to the end (or raises JobError)."""

    def __init__(self, spec: Any, spec_path: str = "") -> None:
        self.spec = spec
        self.spec_path = spec_path

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch

        from janus_job.data import JanusCollator, JanusDataset, load_processor
        from janus_job.model import build_model, local_copy, param_groups
        from janus_job.precompute import load_spec_annotations
        from janus_job.sampler import BalancedBatchSampler, LengthGroupedBatchSampler

        spec, t = self.spec, self.spec.training
        self.ranks, self.device = init_distributed()
        self._seed_everything(t.seed)

        annotations = load_spec_annotations(spec)
        features = _feature_source(spec, annotations, self.ranks, self.device)
        if self.ranks.local_rank == 0:  # one download per node; the others find the finished copy
            local_copy(spec.model.qwen)
        torch.distributed.barrier()
        qwen_dir = local_copy(spec.model.qwen)
        processor = load_processor(qwen_dir, spec.data.min_pixels, spec.data.max_pixels)
        self.dataset = JanusDataset(annotations.samples, processor, features.source, spatial=features.spatial,
                                    vision=features.vision, target_width=features.target_width,
                                    on_bad_sample=spec.data.on_bad_sample, max_bad_fraction=spec.data.max_bad_fraction)
        self.collator = JanusCollator(processor.tokenizer.pad_token_id)

        self.global_batch_size = spec.global_batch_size
        sampler_cls = BalancedBatchSampler if t.balanced_sampler else LengthGroupedBatchSampler
        self.sampler = sampler_cls(
            self._token_lengths(annotations.samples),
            micro_batch_size=t.micro_batch_size,
            world_size=self.ranks.world_size,
            rank=self.ranks.rank,
            global_batch_size=self.global_batch_size,
            seed=t.seed,
        )
        self.accumulation = self.sampler.accumulation
        self.total_steps = t.max_steps or t.epochs * self.sampler.steps_per_epoch
        self.warmup_steps = math.ceil(t.warmup_ratio * self.total_steps)

        dtype = torch.bfloat16 if spec.deepspeed.bf16 else torch.float32
        model = build_model(
            qwen_dir,
            vggt=spec.model.vggt if features.spatial == "online" else None,
            # ZeRO-3 would partition and re-gather the frozen encoder: keep it out of the module tree
            register_vggt=spec.deepspeed.zero_stage < 3,
            spatial_channels=features.spatial_channels,
            dtype=dtype,
            device=self.device,
            attn_implementation=spec.model.attn_implementation,
            gradient_checkpointing=t.gradient_checkpointing,
        )
        self.image_token_id = int(model.config.image_token_id)
        self.params = ParamCounts.of(model)
        groups = param_groups(model, t.learning_rate, t.merger_learning_rate, t.vision_learning_rate,
                              weight_decay=t.weight_decay)
        self.engine = self._deepspeed_engine(model, groups)
        self.step = 0
        self.bad_samples = 0
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None

    def _token_lengths(self, samples: list) -> list[int]:
        """Per-sample load for the sampler. Visual tokens per image come from the first sample's
        first frame (one header read, not one per sample: a VLN dataset's frames share one camera
        resolution; a mixed-resolution set only balances less well)."""
        from janus_job.data import sample_token_length

        per_image = self.dataset.tokens_per_image(samples[0])
        return [sample_token_length(sample, per_image) for sample in samples]

    def _deepspeed_engine(self, model: Any, groups: list[dict]) -> Any:
        import deepspeed
        import torch

        from janus_job.deepspeed import ADAMW_BETAS, ADAMW_EPS, render_deepspeed_config

        spec, t = self.spec, self.spec.training
        config = render_deepspeed_config(spec, self.ranks.world_size)
        if config["gradient_accumulation_steps"] != self.accumulation:
            raise JobError(
                f"internal: DeepSpeed accumulation {config['gradient_accumulation_steps']} differs from the "
                f"sampler's {self.accumulation}"
            )
        optimizer = None
        if "optimizer" not in config:
            # fused: one multi-tensor kernel on CUDA, nothing to compile (DeepSpeed's FusedAdam is JIT-built)
            optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=tuple(ADAMW_BETAS),
                                          eps=ADAMW_EPS, weight_decay=t.weight_decay,
                                          fused=torch.cuda.is_available())
        schedule = dict(total_steps=self.total_steps, warmup_steps=self.warmup_steps, kind=t.scheduler)

        def scheduler(opt: Any) -> Any:
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, **schedule))

        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=groups if optimizer is None else None,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=config,
            dist_init_required=False,
        )
        self.deepspeed_config = config
        return engine

    def _seed_everything(self, seed: int) -> None:
        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # -- checkpoint hooks (janus_job.checkpoint owns the format) -------------------------------

    def client_state(self) -> dict:
        """What a checkpoint must carry besides the engine (the checkpoint module adds RNG states)."""
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "global_batch_size": self.global_batch_size,
            "world_size": self.ranks.world_size,
        }

    def restore(self, client_state: dict) -> None:
        saved = client_state.get("global_batch_size", self.global_batch_size)
        if saved != self.global_batch_size:
            raise JobError(
                f"the checkpoint was trained with a global batch of {saved} samples, this spec gives "
                f"{self.global_batch_size}; set training.global_batch_size: {saved} to resume it"
            )
        self.sampler.load_state_dict(client_state["sampler"])
        self.step = int(client_state["step"])

    def _checkpoints(self) -> Any:
        from janus_job.checkpoint import CheckpointManager

        c = self.spec.training.checkpoint
        return CheckpointManager(c.url, keep=c.keep, interval_steps=c.interval_steps,
                                 rank=self.ranks.rank, world_size=self.ranks.world_size,
                                 local_rank=self.ranks.local_rank)

    # -- the loop -------------------------------------------------------------------------------

    def _micro_batches(self) -> Iterator[dict]:
        """This rank's micro-batches, epoch after epoch, from the sampler's position."""
        from torch.utils.data import DataLoader

        from janus_job.stop import own_process_group

        d = self.spec.data
        workers = d.num_workers
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collator,
            num_workers=workers,
            pin_memory=d.pin_memory and self.device.type == "cuda",
            prefetch_factor=d.prefetch_factor if workers else None,
            persistent_workers=d.persistent_workers and workers > 0,
            worker_init_fn=own_process_group,
        )
        while True:
            if self.sampler.epoch_done:
                self.sampler.set_epoch(self.sampler.epoch + 1)
            yield from loader

    def run(self) -> None:
        from janus_job.gpustats import RankStatsWriter
        from janus_job.stop import StopRequest

        self.setup()
        checkpoints = self._checkpoints()
        latest = checkpoints.latest()
        if latest is not None:
            self.restore(checkpoints.load(self.engine, latest, lr_scheduler=self.engine.lr_scheduler))
        self._announce(latest)
        stats = RankStatsWriter.from_env(interval_seconds=self.spec.monitor.interval_seconds)
        metrics = MetricsFile(metrics_path(self.ranks.rank))
        trace = MetricsFile(_per_rank_path(os.environ.get(SAMPLE_TRACE_ENV), self.ranks.rank))
        batches = self._micro_batches()
        interval = Interval()
        self.engine.train()
        # from here a SIGTERM becomes a checkpoint; before (setup, restore) it ends the rank at once
        stop = StopRequest().install()
        while self.step < self.total_steps:
            step_started = time.perf_counter()
            interval.lr = self._lr()  # the lr this step trains with (the scheduler moves it at the boundary)
            for micro_step in range(self.accumulation):
                waited = time.perf_counter()
                try:
                    batch = next(batches)
                except JobError as err:
                    _reraise_loader_error(err)
                interval.data_wait_s += time.perf_counter() - waited
                trace.write({"step": self.step, "micro_step": micro_step, "rank": self.ranks.rank,
                             "sample_ids": batch["sample_ids"]})
                interval.work.add_batch(batch, self.image_token_id)
                batch.pop("bad_samples", None)
                loss = self.engine(**to_device(batch, self.device)).loss
                self.engine.backward(loss)
                self.engine.step()
                interval.loss_sum = interval.loss_sum + loss.detach().float()
                interval.loss_count += 1
            self.sampler.advance()
            self.step += 1
            interval.steps += 1
            step_time = time.perf_counter() - step_started
            if stats is not None:
                stats.maybe_write(self.step, step_time, self.global_batch_size / step_time)
            if self.step % self.spec.training.log_interval == 0 or self.step == self.total_steps:
                self._log(interval, metrics)
                interval = Interval()
            saved = checkpoints.should_save(self.step)
            if saved:
                self._save(checkpoints)
            if self.step < self.total_steps and stop.agreed(self.device):
                self._stop(checkpoints, saved)
        checkpoints.wait()
        self._finish(metrics)

    def _save(self, checkpoints: Any) -> None:
        checkpoints.save(self.engine, self.step, self.client_state(), lr_scheduler=self.engine.lr_scheduler)

    def _stop(self, checkpoints: Any, saved: bool) -> None:
        """SIGTERM on some rank: checkpoint this step everywhere, then exit for a restart."""
        import torch.distributed as dist

        from janus_job.stop import EXIT_CODE

        if not saved:
            self._save(checkpoints)
        checkpoints.wait()
        # rank 0's wait ends with COMPLETE written; a rank leaving earlier makes its node's torchrun
        # stop the other local ranks, rank 0 among them
        dist.barrier()
        if self.ranks.prints:
            print(f"train stopped step={self.step}/{self.total_steps}: SIGTERM; checkpoint of step {self.step} "
                  f"is complete, exiting with {EXIT_CODE} so the pod restarts and resumes there", flush=True)
        sys.stdout.flush()
        sys.exit(EXIT_CODE)

    def _announce(self, resumed_from: Any) -> None:
        if not self.ranks.prints:
            return
        t, ds = self.spec.training, self.deepspeed_config
        where = ""
        if resumed_from is not None:
            where = f" resumed_from={getattr(resumed_from, 'url', resumed_from)} at step {self.step}"
        print(
            f"train start job={self.spec.name} world={self.ranks.world_size} node={self.ranks.node_rank} "
            f"device={self.device_name or self.device.type} micro={t.micro_batch_size} accum={self.accumulation} "
            f"global_batch={self.global_batch_size} steps={self.total_steps} warmup={self.warmup_steps} "
            f"samples={len(self.dataset)} zero={ds['zero_optimization']['stage']} "
            f"optimizer={'deepspeed' if 'optimizer' in ds else 'torch'} bf16={ds['bf16']['enabled']} "
            f"sampler={type(self.sampler).__name__}{where}",
            flush=True,
        )

    def _log(self, interval: Interval, metrics: MetricsFile) -> None:
        import torch
        import torch.distributed as dist

        from janus_job.gpustats import gather_memory_extremes, peak_memory_bytes

        elapsed = time.perf_counter() - interval.started
        reduce_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        summed = torch.tensor(interval.work.as_list() + [float(interval.loss_sum), interval.loss_count],
                              dtype=torch.float64, device=reduce_device)
        dist.all_reduce(summed)
        waited = torch.tensor([interval.data_wait_s / elapsed], dtype=torch.float64, device=reduce_device)
        dist.all_reduce(waited, op=dist.ReduceOp.MAX)
        values = summed.tolist()
        work = BatchWork.from_list(values[:-2])
        loss = values[-2] / max(values[-1], 1)
        peak = peak_memory_bytes() if self.device.type == "cuda" else None
        extremes = gather_memory_extremes(peak or 0)
        s_per_it = elapsed / max(interval.steps, 1)
        peak_flops = peak_flops_per_device(self.device_name)
        mfu = None
        if peak_flops:
            mfu = model_flops(work, self.params) / (elapsed * peak_flops * self.ranks.world_size)
        record = {
            "event": "train",
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.sampler.epoch,
            "s_per_it": s_per_it,
            "samples_per_s": work.samples / elapsed,
            "tokens_per_s": work.tokens / elapsed,
            "mfu": mfu,
            "data_wait": float(waited.item()),
            "mem_peak_gib": None if peak is None else peak / GIB,
            "mem_min_gib": None if peak is None else extremes.min_bytes / GIB,
            "mem_max_gib": None if peak is None else extremes.max_bytes / GIB,
            "loss": loss,
            "lr": interval.lr,
            "eta_s": (self.total_steps - self.step) * s_per_it,
            "bad_samples": self.bad_samples + work.bad_samples,  # replaced since this run started
            "rank": self.ranks.rank,
            "world_size": self.ranks.world_size,
            "time": time.time(),
        }
        if not math.isfinite(loss):
            raise JobError(f"the loss is {loss} at step {self.step}; lower training.learning_rate or check the data")
        self.bad_samples = record["bad_samples"]
        if self.ranks.prints:
            print(format_log_line(record), flush=True)
            metrics.write(record)

    def _lr(self) -> float:
        groups = self.engine.optimizer.param_groups
        for group in groups:
            if str(group.get("name", "")).startswith("llm"):
                return float(group["lr"])
        return float(groups[0]["lr"])

    def _finish(self, metrics: MetricsFile) -> None:
        """Prints the norm of all trainable parameters: equal on every rank when they agree."""
        import torch

        total = torch.zeros((), dtype=torch.float64)
        for param in self.engine.module.parameters():
            if param.requires_grad:
                total += param.detach().double().pow(2).sum().cpu()
        norm = float(total.sqrt())
        record = {"event": "done", "step": self.step, "param_norm": norm, "rank": self.ranks.rank}
        print(f"train done step={self.step} rank={self.ranks.rank} param_norm={norm:.10e}", flush=True)
        metrics.write(record)


def run(spec_path: str) -> None:
    from janus_job.spec import load_spec

    Trainer(load_spec(spec_path), spec_path).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m janus_job.train", description="Run one training rank.")
    parser.add_argument("--spec", required=True, help="job spec YAML")
    args = parser.parse_args(argv)
    try:
        run(args.spec)
    except JobError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

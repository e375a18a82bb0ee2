"""What a training run reports: the FLOP model and MFU, the log line, the per-rank metrics file.

docs/training.md defines every field of the log line and the FLOP model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

METRICS_FILE_ENV = "JANUS_METRICS_FILE"
PEAK_TFLOPS_ENV = "JANUS_PEAK_TFLOPS"  # per-device peak for MFU where the card is not in the table
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

    @classmethod
    def of(cls, batch: dict, image_token_id: int) -> "BatchWork":
        """The counts of one host micro-batch (its tensors on the CPU: counting device tensors would
        synchronise with the GPU)."""
        work = cls()
        work.add_batch(batch, image_token_id)
        return work

    def add(self, other: "BatchWork") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

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


def per_rank_path(template: str | None, rank: int) -> str | None:
    if not template:
        return None
    if "{rank}" in template:
        return template.replace("{rank}", str(rank))
    return template if rank == 0 else f"{template}.rank{rank}"


def metrics_path(rank: int, env: dict | None = None) -> str | None:
    env = os.environ if env is None else env
    if env.get(METRICS_FILE_ENV):
        return per_rank_path(env[METRICS_FILE_ENV], rank)
    if env.get("JANUS_STATS_DIR"):
        return os.path.join(env["JANUS_STATS_DIR"], f"train-metrics-rank{rank}.jsonl")
    return None

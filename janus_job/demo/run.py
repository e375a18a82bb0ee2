"""`janus-job demo`: the whole pipeline on one machine, on embedded defaults, in about a minute.

1. synthesise a small JanusVLN-format dataset: a few trajectories of generated frames, annotated
   with the builder's default prompt and JanusVLN's history rule (janus_job.data.annotations);
2. write tiny random encoders and LLM as real checkpoints: a Qwen2.5-VL directory (config,
   weights, tokenizer, image processor) and a VGGT aggregator checkpoint (janus_job.demo.tiny);
3. precompute the frozen features into a local feature store (janus_job.features.precompute);
4. train a few optimizer steps through the same code path a cluster rank runs (janus_job.train.trainer),
   printing the same log lines; on a machine with a GPU it trains there.

Nothing is downloaded. Everything lands in --workdir (default: a new temporary directory).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import yaml

from janus_job.errors import JobError

DEMO_EPISODES = 4
DEMO_STEPS_PER_EPISODE = 6  # samples per episode; history grows to 6 frames
FRAME_SIZE = (160, 120)  # generated frames; preprocessing scales them to data.frame_width
SEED = 0
TINY_MODEL_SEED = 1234
DEMO_FRAME_WIDTH = 112  # the tiny flavor's frame width (JanusVLN's is 644)
INSTRUCTIONS = (
    "walk past the sofa and stop at the kitchen door",
    "turn left at the stairs and wait by the window",
    "exit the bathroom and go to the hall",
    "go forward to the dining table and stop",
)
ACTIONS = ("MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT")


def synthesize_dataset(root: Path, episodes: int = DEMO_EPISODES, steps: int = DEMO_STEPS_PER_EPISODE,
                       frame_size: tuple[int, int] = FRAME_SIZE) -> Path:
    """Trajectory folders of generated frames plus a JanusVLN annotation file; returns its path."""
    import numpy as np
    from PIL import Image

    from janus_job.data.annotations import trajectory_records, write_annotations

    rng = np.random.default_rng(SEED)
    width, height = frame_size
    records = []
    for episode in range(episodes):
        folder = root / "images" / f"ep{episode:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        frames = []
        for step in range(steps):
            # a smooth colour field drifting with the step, plus noise: distinct but image-like
            y, x = np.mgrid[0:height, 0:width]
            field = (base[None, None, :] + np.stack([x, y, x + y], axis=-1) * (step + 1)) % 256
            noise = rng.integers(0, 24, size=(height, width, 3))
            pixels = np.clip(field + noise, 0, 255).astype(np.uint8)
            name = f"ep{episode:03d}/{step:03d}.jpg"
            Image.fromarray(pixels).save(root / "images" / name, quality=90)
            frames.append(name)
        actions = [ACTIONS[(episode + step) % len(ACTIONS)] for step in range(steps - 1)] + ["STOP"]
        records += trajectory_records(f"ep{episode:03d}", frames, INSTRUCTIONS[episode % len(INSTRUCTIONS)], actions)
    annotations = root / "annotations.json"
    write_annotations(records, annotations)
    return annotations


def write_tiny_models(root: Path, seed: int = TINY_MODEL_SEED, *, text_hidden: int = 64,
                      text_layers: int = 2) -> tuple[Path, Path]:
    """Seeded random checkpoints of the tiny flavor (janus_job.models.flavors): a Qwen2.5-VL directory
    (config, weights, tokenizer, image processor) and a VGGT aggregator checkpoint that describes its
    own architecture. Every job step reads them as it reads the real ones. `text_hidden` and
    `text_layers` widen and deepen the language model (benches that need more than the demo's)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from janus_job.demo.tiny import tiny_image_processor, tiny_qwen_config, tiny_tokenizer
    from janus_job.models.flavors import vggt_config
    from janus_job.models.vggt import FrameCausalAggregator, save_aggregator

    torch.manual_seed(seed)
    aggregator = FrameCausalAggregator(vggt_config("tiny"))
    qwen_dir = root / "qwen-tiny"
    tokenizer = tiny_tokenizer()
    config = tiny_qwen_config(tokenizer, text_hidden=text_hidden, text_layers=text_layers)
    config.spatial_channels = 2 * int(aggregator.config.embed_dim)
    qwen = Qwen2_5_VLForConditionalGeneration(config)
    qwen.save_pretrained(qwen_dir)
    tokenizer.save_pretrained(qwen_dir)
    tiny_image_processor().save_pretrained(qwen_dir)

    vggt_path = root / "vggt-tiny.safetensors"
    save_aggregator(aggregator, vggt_path)
    return qwen_dir, vggt_path


def demo_spec(workdir: Path, annotations: Path, qwen_dir: Path, vggt_path: Path, *, steps: int, gpu: bool,
              nodes: int = 1, micro_batch_size: int = 2, global_batch_size: int = 4) -> dict:
    """The demo's job spec: the same schema a cluster job uses, sized for a laptop."""
    return {
        "name": "janus-demo",
        "model": {"qwen": str(qwen_dir), "vggt": str(vggt_path)},
        "data": {
            "annotations": str(annotations),
            "image_root": str(annotations.parent / "images"),
            # the tiny flavor works at 112 px frames; keep the Qwen processor from resizing them
            "frame_width": DEMO_FRAME_WIDTH,
            "min_pixels": 4 * 28 * 28,
            "num_workers": 0,
            "pin_memory": gpu,
            "persistent_workers": False,
        },
        "features": {
            "store": str(workdir / "store"),
            "mode": "precomputed",
            "credentials_from": "environment",
            "cache_dir": str(workdir / "cache"),
            "cache_size_gib": 0,
        },
        "precompute": {"pods": 1, "gpus_per_pod": 1, "batch_size": 4},
        "training": {
            "nodes": nodes,
            "gpus_per_node": 1,
            "micro_batch_size": micro_batch_size,
            "global_batch_size": global_batch_size,
            "max_steps": steps,
            "learning_rate": 1e-3,
            "merger_learning_rate": 1e-3,
            "warmup_ratio": 0.2,
            "gradient_checkpointing": False,
            "log_interval": 1,
            "checkpoint": {"url": str(workdir / "checkpoints"), "interval_steps": 1_000_000, "keep": 1},
            "resize": {"policy": "fixed"},
        },
        # torch AdamW: nothing to compile on a machine without a CUDA toolchain.
        "deepspeed": {"optimizer": "torch", "bf16": gpu},
        # The fit check estimates the full-size 7B model; the demo's tiny one fits anywhere.
        "cluster": {"resources": {"gpu_memory_gib": 100_000}},
        "monitor": {"enabled": False},
    }


def prepare_job(workdir: Path, *, steps: int, gpu: bool, **spec_options) -> Path:
    """Dataset, tiny models and the spec in `workdir`; returns the spec's path."""
    annotations = synthesize_dataset(workdir / "data")
    qwen_dir, vggt_path = write_tiny_models(workdir / "models")
    spec = demo_spec(workdir, annotations, qwen_dir, vggt_path, steps=steps, gpu=gpu, **spec_options)
    spec_path = workdir / "job.yaml"
    tmp = spec_path.with_name(".job.yaml.tmp")
    tmp.write_text(yaml.safe_dump(spec, sort_keys=False))
    os.replace(tmp, spec_path)
    return spec_path


def precompute_features(spec_path: Path) -> None:
    """Fills the spec's store, in this process (one worker): what `janus-job precompute` runs."""
    from janus_job.config.load import load_spec
    from janus_job.features.precompute import run_pod

    run_pod(load_spec(spec_path), str(spec_path), index=0, progress_interval_s=3600.0)


def run_demo(workdir: str | None = None, steps: int = 6) -> Path:
    """Runs the demo end to end; returns the work directory."""
    started = time.perf_counter()
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="janus-demo-"))
    if root.exists() and any(root.iterdir()):
        raise JobError(f"--workdir {root} is not empty; give a new or empty directory")
    root.mkdir(parents=True, exist_ok=True)

    import torch

    from janus_job.train.trainer import run as train

    gpu = torch.cuda.is_available()
    print(f"demo: working in {root} ({'GPU' if gpu else 'CPU'})", flush=True)
    spec_path = prepare_job(root, steps=steps, gpu=gpu)
    print(f"demo: synthetic dataset, tiny models and {spec_path.name} written "
          f"({time.perf_counter() - started:.1f}s); precomputing features", flush=True)
    precompute_features(spec_path)
    print(f"demo: features in {root / 'store'} ({time.perf_counter() - started:.1f}s); training", flush=True)
    train(str(spec_path))
    print(f"demo: done in {time.perf_counter() - started:.1f}s; the job spec is {spec_path}", flush=True)
    return root

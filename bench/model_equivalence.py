"""Loss from cached features vs loss from the online encoders, on the same batch.

Full size (GPU): JanusVLN on Qwen2.5-VL-7B + VGGT-1B shapes with random weights, bf16 model,
VGGT fp32 weights under bf16 autocast (as JanusVLN), built directly on the GPU. One micro batch
at the official geometry (9 frames of 640x480 -> 490x644 VGGT input, 476x644 Qwen input,
391 visual tokens per frame) goes through the real data path twice:

  online   vggt_frames + pixel_values: the aggregator and transformers' vision tower in the step
  cached   spatial_features + vision_features: computed beforehand by the same encoders, one
           sample / one frame at a time, stored as bf16 (what the feature store holds)

Pass: relative loss error <= 1e-2 (bf16); --tiny (CPU, fp32, tiny configs): <= 1e-6.
Timings of the two forwards are printed for information (no claim is made from them).

GPU:  python3 bench/model_equivalence.py [--images 9] [--images 9,4]
CI:   python3 bench/model_equivalence.py --tiny
Writes model_equivalence[_tiny].json to $OUT if set, else bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

OFFICIAL_SIZE = (640, 480)
TINY_SIZE = (160, 120)
TINY_TARGET_WIDTH = 224
PROMPT = ("You are a navigation agent. Walk past the sofa, turn left at the kitchen door and stop "
          "next to the dining table. These are your historical observations: {history}. This is "
          "your current observation: <image>\nWhat is the next action?")
ANSWER = "The next action is move forward 25 cm."


def write_frames(folder: str, count: int, size, seed: int = 0) -> list[str]:
    """Smooth random frames (gradients + noise) so the image codecs behave like real ones."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    names = []
    for i in range(count):
        base = (xx * rng.uniform(0.1, 0.5) + yy * rng.uniform(0.1, 0.5) + i * 17) % 256
        pixels = np.stack([base, base[::-1], base[:, ::-1]], axis=-1)
        pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
        name = f"frame_{i:03d}.png"
        Image.fromarray(pixels).save(os.path.join(folder, name))
        names.append(name)
    return names


def make_samples(folder: str, image_counts: list[int], size):
    from janus_job.data.annotations import Sample

    names = write_frames(folder, max(image_counts) + len(image_counts), size)
    samples = []
    for b, count in enumerate(image_counts):
        images = tuple(names[b:b + count])
        human = PROMPT.format(history="<image>" * (count - 1))
        samples.append(Sample(
            id=f"bench/{b}", images=images,
            conversations=({"from": "human", "value": human}, {"from": "gpt", "value": ANSWER}),
            frame_paths=tuple(os.path.join(folder, name) for name in images)))
    return samples


def build(tiny: bool, device, attn: str):
    import torch

    from janus_job.demo import tiny as tiny_parts
    from janus_job.models.flavors import qwen25_vl_7b_config
    from janus_job.models.janusvln.build import build_model
    from janus_job.models.vggt import VGGTAggregatorConfig

    processor = tiny_parts.tiny_processor(min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28)
    tokenizer = processor.tokenizer
    if tiny:
        config = tiny_parts.tiny_qwen_config(tokenizer)
        vggt_config = VGGTAggregatorConfig.tiny()
        dtype = torch.float32
    else:
        config = qwen25_vl_7b_config()
        # the real Qwen tokenizer is not offline here: the tiny tokenizer's ids stand in for
        # Qwen's special tokens (the LM head and embeddings keep the full 152064 vocabulary)
        for attr, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                            ("vision_start_token_id", "<|vision_start|>"),
                            ("vision_end_token_id", "<|vision_end|>")):
            setattr(config, attr, tokenizer.convert_tokens_to_ids(token))
        vggt_config = VGGTAggregatorConfig()
        dtype = torch.bfloat16
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(config, vggt_config, dtype=dtype, device=device,
                                    attn_implementation=attn, vggt_dtype=torch.float32)
    model.eval()
    if tiny:  # random tiny weights are nearly blind to their inputs: sharpen them
        with torch.no_grad():
            model.merger.mlp[2].weight.mul_(20)
            model.model.visual.merger.mlp[2].weight.mul_(20)
            model.lm_head.weight.mul_(50)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model, processor, dtype, time.perf_counter() - start


def to_device(batch: dict, device) -> dict:
    import torch

    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            out[key] = [v.to(device) for v in value]
        else:
            out[key] = value
    return out


def timed_loss(model, batch, device) -> tuple[float, float, int]:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(**batch)
    loss = float(out.loss)
    return loss, time.perf_counter() - start, int(out.num_label_tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, fp32, tiny configs (CI)")
    parser.add_argument("--images", default="9", help="images per sample of the micro batch, e.g. 9 or 9,4")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation of the LLM")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results)")
    args = parser.parse_args()

    import torch

    from janus_job.data import dataset as data
    from janus_job.demo import tiny as tiny_parts

    counts = [int(c) for c in args.images.split(",")]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    size = TINY_SIZE if args.tiny else OFFICIAL_SIZE
    target_width = TINY_TARGET_WIDTH if args.tiny else None
    threshold = 1e-6 if args.tiny else 1e-2

    model, processor, dtype, build_s = build(args.tiny, device, args.attn)
    with tempfile.TemporaryDirectory(prefix="janus-eq-") as folder:
        samples = make_samples(folder, counts, size)
        width = target_width or __import__("janus_job.data.frames", fromlist=["x"]).VGGT_TARGET_WIDTH
        start = time.perf_counter()
        features = tiny_parts.MemoryFeatureSource.computed(model, samples, width, processor.image_processor,
                                                           dtype=None if args.tiny else torch.bfloat16)
        precompute_s = time.perf_counter() - start
        collate = data.JanusCollator(processor.tokenizer.pad_token_id)

        def batch(spatial: str, vision: str) -> dict:
            ds = data.JanusDataset(samples, processor, features, spatial=spatial, vision=vision,
                                   target_width=width)
            return to_device(collate([ds[i] for i in range(len(samples))]), device)

        online_batch = batch("online", "online")
        cached_batch = batch("cached", "cached")
    timed_loss(model, cached_batch, device)  # warm-up (kernels, allocator)
    online, online_s, labels = timed_loss(model, online_batch, device)
    cached, cached_s, _ = timed_loss(model, cached_batch, device)
    rel = abs(cached - online) / abs(online)
    result = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tiny": args.tiny,
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": args.attn,
        "images_per_sample": counts,
        "frame_size": list(size),
        "sequence_tokens": int(online_batch["attention_mask"].sum()),
        "visual_tokens": int((online_batch["input_ids"] == model.config.image_token_id).sum()),
        "label_tokens": labels,
        "loss_online": online,
        "loss_cached": cached,
        "rel_error": rel,
        "threshold": threshold,
        "passed": rel <= threshold,
        "forward_s_online": online_s,
        "forward_s_cached": cached_s,
        "build_s": build_s,
        "precompute_s": precompute_s,
        "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
    }
    rows = [("card", result["card"]), ("images/sample", args.images),
            ("tokens (visual)", f"{result['sequence_tokens']} ({result['visual_tokens']})"),
            ("loss online", f"{online:.6f}"), ("loss cached", f"{cached:.6f}"),
            ("rel error", f"{rel:.3e} (<= {threshold:g}: {'PASS' if result['passed'] else 'FAIL'})"),
            ("forward online s", f"{online_s:.3f}"), ("forward cached s", f"{cached_s:.3f}"),
            ("build s", f"{build_s:.1f}"), ("params (B)", f"{result['params_b']:.2f}")]
    for name, value in rows:
        print(f"{name:<18} {value}")
    folder = Path(args.out or os.environ.get("OUT") or REPO_ROOT / "bench" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("model_equivalence_tiny.json" if args.tiny else "model_equivalence.json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

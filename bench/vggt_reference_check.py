"""Our frame-causal VGGT aggregator vs JanusVLN's reference implementation.

Builds the reference aggregator (imported from an untracked copy, never committed) with seeded
random weights, loads its state dict into ours strictly, and compares the cached feature (last
frame, layer depth-2, patch tokens, even grid) on the official geometry (640x480 frames ->
490x644) for 1, 5 and 9 frames, in our batched and streaming modes, against the reference
streamed frame by frame with past_key_values as JanusVLN does: fp32 (limit 1e-4) and bf16
autocast over fp32 weights as JanusVLN runs it (limit 1e-2). Also checks our decode +
preprocessing against the reference's load_and_preprocess_images bit for bit (needs torchvision).

GPU:  python3 bench/vggt_reference_check.py --reference-dir .ref/src/qwen_vl/model
CI:   python3 bench/vggt_reference_check.py --tiny [--reference-dir ...]   (CPU, tiny config)
Writes vggt_reference_check[_tiny].json to $OUT if set, else bench/results/; exit 1 on a miss.
"""

from __future__ import annotations

import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

OFFICIAL_SOURCE_SIZE = (640, 480)  # width, height of the R2R/RxR habitat frames
TINY_TARGET_WIDTH = 70  # 640x480 -> 56x70, a 4x5 patch grid


def import_reference(reference_dir: str | None):
    """Import JanusVLN's ``qwen_vl.model.vggt`` from ``<reference_dir>/vggt`` without running
    any ``qwen_vl`` package ``__init__``. Returns the package module, or None without a dir."""
    if not reference_dir:
        return None
    model_dir = Path(reference_dir).resolve()
    if not (model_dir / "vggt" / "models" / "aggregator.py").is_file():
        raise SystemExit(f"--reference-dir {reference_dir}: no vggt/models/aggregator.py under it "
                         "(pass the directory that contains JanusVLN's vggt/, e.g. "
                         ".ref/src/qwen_vl/model)")
    try:
        import einops  # noqa: F401  (imported, unused, by the reference's attention.py)
    except ImportError:
        stub = types.ModuleType("einops")
        stub.rearrange = stub.repeat = None
        sys.modules["einops"] = stub
    for name, path in (("qwen_vl", model_dir.parent), ("qwen_vl.model", model_dir)):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    import importlib

    return importlib.import_module("qwen_vl.model.vggt")


def build_reference(ref_pkg, cfg):
    """The reference Aggregator with the architecture of ``cfg`` (a VGGTAggregatorConfig)."""
    import importlib
    from functools import partial

    agg_mod = importlib.import_module("qwen_vl.model.vggt.models.aggregator")
    if cfg.embed_dim == 1024 and cfg.patch_embed_depth == 24:
        return agg_mod.Aggregator(
            img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            num_register_tokens=cfg.num_register_tokens, rope_freq=cfg.rope_freq,
            qk_norm=cfg.qk_norm, init_values=cfg.init_values)
    # Small configs: the reference only offers fixed DINOv2 sizes, so build its aggregator with the
    # conv stem and swap in its own DinoVisionTransformer class at our size.
    vit = importlib.import_module("qwen_vl.model.vggt.layers.vision_transformer")
    layers = importlib.import_module("qwen_vl.model.vggt.layers")
    ref = agg_mod.Aggregator(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        num_register_tokens=cfg.num_register_tokens, patch_embed="conv",
        rope_freq=cfg.rope_freq, qk_norm=cfg.qk_norm, init_values=cfg.init_values)
    ref.patch_embed = vit.DinoVisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
        depth=cfg.patch_embed_depth, num_heads=cfg.patch_embed_heads,
        mlp_ratio=cfg.patch_embed_mlp_ratio,
        block_fn=partial(layers.NestedTensorBlock, attn_class=layers.MemEffAttention),
        num_register_tokens=cfg.num_register_tokens, interpolate_antialias=True,
        interpolate_offset=0.0, block_chunks=0, init_values=cfg.patch_embed_init_values)
    ref.patch_embed.mask_token.requires_grad_(False)
    return ref


def randomize_(module, seed: int) -> None:
    """Seeded weights that make every part matter (stock init has LayerScale 0.01 and ~0 special
    tokens, which would hide errors in the blocks, the causal mask and the first-frame slot)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.25 + 0.05)
            elif "norm" in name and leaf == "weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif leaf == "bias":
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif leaf in ("camera_token", "register_token", "cls_token", "register_tokens",
                          "pos_embed", "mask_token"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def synthetic_frame(seed: int, size=OFFICIAL_SOURCE_SIZE) -> np.ndarray:
    """A 640x480 uint8 RGB frame with smooth structure plus noise (seeded)."""
    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    freq = rng.uniform(0.005, 0.05, size=(3, 2))
    chans = [127 + 80 * np.sin(freq[c, 0] * yy + freq[c, 1] * xx + phase[c]) for c in range(3)]
    img = np.stack(chans, axis=-1) + rng.normal(0, 20, size=(height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def sample_frames(num_frames: int, target_width: int, seed: int = 0):
    """``(S, 3, H, W)`` preprocessed frames of one synthetic sample."""
    import torch

    from janus_job.data.frames import preprocess_for_vggt

    return torch.stack([preprocess_for_vggt(synthetic_frame(seed * 1000 + j), target_width)
                        for j in range(num_frames)])


def rel_error(actual, expected) -> float:
    a = actual.double()
    b = expected.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def write_json(name: str, payload: dict, out: str | None) -> Path:
    folder = Path(out or os.environ.get("OUT") or REPO_ROOT / "bench" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- the check


def reference_stream(ref, frames, autocast_dtype):
    """JanusVLN's way: one frame at a time with past_key_values; layer -2 of the last frame."""
    import torch

    past = [None] * ref.depth
    with torch.no_grad(), torch.autocast(frames.device.type, dtype=autocast_dtype or torch.float32,
                                         enabled=autocast_dtype is not None):
        for k, frame in enumerate(frames):
            tokens, start, past = ref(frame[None, None], past_key_values=past, use_cache=True,
                                      past_frame_idx=k)
    feat = tokens[-2][0, :, start:]
    rows, cols = frames.shape[-2] // ref.patch_size, frames.shape[-1] // ref.patch_size
    feat = feat.reshape(rows, cols, -1)
    return feat[: rows // 2 * 2, : cols // 2 * 2].float()


def ours(model, frames, mode, autocast_dtype):
    import torch

    from janus_job.models.vggt import spatial_features

    with torch.autocast(frames.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        return spatial_features(model, frames[None], mode=mode)[0].float()


def check_preprocessing(ref_pkg, tiny: bool) -> dict:
    """Our decode + preprocessing vs the reference's load_and_preprocess_images, bit for bit."""
    import importlib
    import tempfile

    import torch
    from PIL import Image

    from janus_job.data.frames import load_frame, preprocess_for_vggt

    try:
        load_fn = importlib.import_module("qwen_vl.model.vggt.utils.load_fn")
    except ImportError as err:
        return {"skipped": f"reference load_fn not importable here ({err})"}
    cases = []
    sizes = [(640, 480), (480, 640), (1280, 720), (644, 35), (300, 1000), (517, 389)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, size in enumerate(sizes):
            rgb = synthetic_frame(100 + i, size)
            for kind, img in (("png", Image.fromarray(rgb)),
                              ("jpg", Image.fromarray(rgb)),
                              ("rgba png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])))):
                path = f"{tmp}/frame{i}.{kind.split()[-1]}"
                img.save(path)
                expected = load_fn.load_and_preprocess_images([path])[0]
                got = preprocess_for_vggt(load_frame(path))
                same = got.shape == expected.shape and torch.equal(got, expected)
                cases.append({"source": f"{size[0]}x{size[1]} {kind}",
                              "shape": list(got.shape), "bit_equal": bool(same)})
    return {"cases": cases, "ok": all(c["bit_equal"] for c in cases)}


def main() -> int:
    import argparse

    import torch

    from janus_job.data.frames import frame_geometry
    from janus_job.models.vggt import FrameCausalAggregator, VGGTAggregatorConfig

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", help="directory holding JanusVLN's vggt/ package")
    parser.add_argument("--tiny", action="store_true", help="tiny config and geometry on CPU")
    parser.add_argument("--frames", default="1,5,9")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output folder (default $OUT, else bench/results)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = VGGTAggregatorConfig.tiny() if args.tiny else VGGTAggregatorConfig()
    target_width = TINY_TARGET_WIDTH if args.tiny else 644
    ref_pkg = import_reference(args.reference_dir)
    frame_counts = [int(n) for n in args.frames.split(",")]
    geometry = frame_geometry(*OFFICIAL_SOURCE_SIZE, target_width=target_width)
    result = {
        "bench": "vggt_reference_check", "device": device_name(device), "tiny": args.tiny,
        "torch": torch.__version__, "config": cfg.to_dict(), "seed": args.seed,
        "geometry": {"source": list(OFFICIAL_SOURCE_SIZE),
                     "vggt_hw": [geometry.vggt_height, geometry.vggt_width],
                     "spatial_grid": list(geometry.spatial_grid)},
        "thresholds": {"fp32": 1e-4, "bf16": 1e-2}, "rows": [],
    }

    torch.manual_seed(args.seed)
    if ref_pkg is not None:
        ref = build_reference(ref_pkg, cfg)
        randomize_(ref, args.seed)
        ref_state = ref.state_dict()
        model = FrameCausalAggregator(cfg)
        ours_keys = set(model.state_dict())
        missing, unexpected = sorted(set(ref_state) - ours_keys), sorted(ours_keys - set(ref_state))
        model.load_state_dict(ref_state, strict=True)
        result["state_dict"] = {"reference_keys": len(ref_state), "missing": missing,
                                "unexpected": unexpected}
        ref = ref.to(device).eval()
        result["preprocessing"] = check_preprocessing(ref_pkg, args.tiny)
    else:
        ref = None
        model = FrameCausalAggregator(cfg)
        randomize_(model, args.seed)
        result["reference"] = "skipped: no --reference-dir (only our batched vs streaming paths)"
    model = model.to(device).eval()

    bf16 = torch.bfloat16
    for s in frame_counts:
        frames = sample_frames(s, target_width, seed=args.seed + s).to(device)
        for precision, autocast_dtype in (("fp32", None), ("bf16", bf16)):
            limit = result["thresholds"][precision]
            baseline = (reference_stream(ref, frames, autocast_dtype) if ref is not None
                        else ours(model, frames, "streaming", None))
            against = "reference streamed" if ref is not None else "ours streaming fp32"
            for mode in ("batched", "batched-mask", "streaming"):
                model.causal_impl = "mask" if mode == "batched-mask" else "chunked"
                got = ours(model, frames, mode.split("-")[0], autocast_dtype)
                model.causal_impl = "chunked"
                err = rel_error(got, baseline)
                result["rows"].append({"frames": s, "precision": precision, "mode": mode,
                                       "against": against, "shape": list(got.shape),
                                       "rel_error": err, "limit": limit, "ok": err <= limit})
        if ref is not None:
            # Every frame's layer depth-2 output (camera/register tokens included) against the
            # reference's own batched mode (one pass with its additive block-causal mask).
            with torch.no_grad():
                theirs = ref(frames[None])[0][-2].float()
                got = model(frames[None], frames="all").float()
            err = rel_error(got, theirs)
            result["rows"].append({"frames": s, "precision": "fp32", "mode": "batched-all",
                                   "against": "reference batched (mask), all frames",
                                   "shape": list(got.shape), "rel_error": err,
                                   "limit": 1e-4, "ok": err <= 1e-4})
            del theirs, got
    if ref is not None and device.type == "cuda":
        # Informational: our path with bf16 weights (no autocast) vs the reference's autocast.
        model_bf16 = model.to(bf16)
        for s in frame_counts:
            frames = sample_frames(s, target_width, seed=args.seed + s).to(device)
            baseline = reference_stream(ref, frames, bf16)
            got = ours(model_bf16, frames.to(bf16), "batched", None)
            result["rows"].append({"frames": s, "precision": "bf16-weights", "mode": "batched",
                                   "against": "reference streamed (autocast)",
                                   "rel_error": rel_error(got, baseline), "limit": None,
                                   "ok": None, "info": True})

    gates = [r["ok"] for r in result["rows"] if r["ok"] is not None]
    if "state_dict" in result:
        gates.append(not result["state_dict"]["missing"] and not result["state_dict"]["unexpected"])
    if isinstance(result.get("preprocessing"), dict) and "ok" in result["preprocessing"]:
        gates.append(result["preprocessing"]["ok"])
    result["ok"] = all(gates)

    print(f"device: {result['device']}  config: {'tiny' if args.tiny else 'VGGT-1B'}  "
          f"frames {geometry.vggt_height}x{geometry.vggt_width} -> grid {geometry.spatial_grid}")
    if "state_dict" in result:
        sd = result["state_dict"]
        print(f"reference state dict: {sd['reference_keys']} keys, missing {len(sd['missing'])}, "
              f"unexpected {len(sd['unexpected'])}")
    prep = result.get("preprocessing")
    if prep and "cases" in prep:
        bad = [c["source"] for c in prep["cases"] if not c["bit_equal"]]
        print(f"preprocessing vs reference load_and_preprocess_images: "
              f"{len(prep['cases']) - len(bad)}/{len(prep['cases'])} bit-equal {bad or ''}")
    elif prep:
        print(f"preprocessing vs reference: {prep['skipped']}")
    print(f"{'frames':>6} {'precision':>12} {'mode':>10} {'rel_error':>11} {'limit':>7}  ok")
    for r in result["rows"]:
        limit = "-" if r["limit"] is None else f"{r['limit']:.0e}"
        print(f"{r['frames']:>6} {r['precision']:>12} {r['mode']:>10} {r['rel_error']:>11.3e} "
              f"{limit:>7}  {r['ok']}")
    name = "vggt_reference_check_tiny.json" if args.tiny else "vggt_reference_check.json"
    path = write_json(name, result, args.out)
    print(f"{'PASS' if result['ok'] else 'FAIL'}; wrote {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Spatial-feature throughput of the VGGT encoder path: samples/s per GPU, side by side.

One sample = 9 frames at the official geometry (640x480 -> 490x644), the cached value is the
last frame's layer-22 feature (34x46x2048). Rows, all on the same card, same random weights:

  reference streamed   JanusVLN's loop: one frame at a time with past_key_values, fp32 weights
                       under bf16 autocast, all 24 layers (needs --reference-dir)
  ours streaming       our KV-cache path, one frame at a time, stops after layer 22
  ours batched         one frame-causal pass per batch of samples (batch 1, 2, 4, 8), for each
                       block-causal implementation (chunked SDPA calls / boolean mask) and each
                       weight precision (fp32 weights + bf16 autocast like JanusVLN / bf16 weights)

Frames are preprocessed once and already on the GPU: this measures the encoder, not decode
(decode + preprocess throughput per CPU core is printed separately). Goal: >= 2.5 samples/s/H100.

GPU:  python3 bench/precompute.py [--reference-dir .ref/src/qwen_vl/model]
CI:   python3 bench/precompute.py --tiny   (CPU, tiny config and geometry)
Writes precompute[_tiny].json to $OUT if set, else bench/results/.
"""

from __future__ import annotations

import argparse
import io
import sys
import time

from vggt_reference_check import (
    OFFICIAL_SOURCE_SIZE,
    TINY_TARGET_WIDTH,
    build_reference,
    device_name,
    import_reference,
    sample_frames,
    synthetic_frame,
    write_json,
)

GOAL_SAMPLES_PER_S = 2.5


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run, samples_per_call: int, device, warmup: int, iters: int) -> dict:
    """Time ``run()``; returns samples/s and peak memory. OOM is reported, not raised."""
    import torch

    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            run()
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            run()
        sync(device)
        elapsed = time.perf_counter() - start
    except torch.cuda.OutOfMemoryError:
        return {"samples_per_s": 0.0, "error": "out of memory"}
    row = {"samples_per_s": samples_per_call * iters / elapsed,
           "s_per_call": elapsed / iters}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def preprocess_rate(seconds: float = 2.0) -> dict:
    """Decode a 640x480 JPEG and preprocess it, on one core: frames/s."""
    from PIL import Image

    from janus_job.data.frames import load_frame, preprocess_for_vggt

    buf = io.BytesIO()
    Image.fromarray(synthetic_frame(7)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        preprocess_for_vggt(load_frame(data))
        count += 1
    return {"frames_per_s_per_core": count / (time.perf_counter() - start)}


def main() -> int:
    import torch

    from janus_job.models.vggt import FrameCausalAggregator, VGGTAggregatorConfig, spatial_features

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", help="directory holding JanusVLN's vggt/ package")
    parser.add_argument("--tiny", action="store_true", help="tiny config and geometry on CPU")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--batch-sizes", default=None, help="default 1,2,4,8 (tiny: 1,2)")
    parser.add_argument("--impls", default="chunked,mask")
    parser.add_argument("--weights", default="autocast,bf16",
                        help="fp32 weights under bf16 autocast, and/or bf16 weights")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per row")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd batched rows (chunked impl)")
    parser.add_argument("--out", help="output folder (default $OUT, else bench/results)")
    args = parser.parse_args()

    tiny = args.tiny
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = VGGTAggregatorConfig.tiny() if tiny else VGGTAggregatorConfig()
    target_width = TINY_TARGET_WIDTH if tiny else 644
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if tiny else "1,2,4,8")).split(",")]
    iters = args.iters or (1 if tiny else 3)
    warmup = 1
    bf16 = torch.bfloat16

    torch.manual_seed(0)
    with torch.device("meta"):
        model = FrameCausalAggregator(cfg)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.1)
            elif "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0, 0.02)
    sample = sample_frames(args.frames, target_width).to(device)
    height, width = sample.shape[-2:]

    result = {"bench": "precompute", "device": device_name(device), "tiny": tiny,
              "torch": torch.__version__, "frames_per_sample": args.frames,
              "frame_hw": [height, width], "source": list(OFFICIAL_SOURCE_SIZE),
              "goal_samples_per_s": GOAL_SAMPLES_PER_S, "rows": []}

    def add(path: str, weights: str, impl: str, batch: int, row: dict) -> None:
        row.update(path=path, weights=weights, impl=impl, batch=batch)
        result["rows"].append(row)
        print(f"  {path:>18} {weights:>9} {impl:>8} b={batch}: "
              f"{row['samples_per_s']:.3f} samples/s {row.get('error', '')}", flush=True)

    ref_pkg = import_reference(args.reference_dir)
    if ref_pkg is not None:
        ref = build_reference(ref_pkg, cfg)
        ref.load_state_dict(model.state_dict())
        ref = ref.to(device).eval()

        def reference_stream():
            past = [None] * ref.depth
            with torch.no_grad(), torch.autocast(device.type, dtype=bf16):
                for k, frame in enumerate(sample):
                    tokens, start, past = ref(frame[None, None], past_key_values=past,
                                              use_cache=True, past_frame_idx=k)
                return tokens[-2][0, :, start:]

        add("reference streamed", "autocast", "-", 1, measure(reference_stream, 1, device, warmup, iters))
        del ref
    else:
        result["reference"] = "skipped: no --reference-dir"

    for weights in args.weights.split(","):
        run_model = model if weights == "autocast" else model.to(bf16)
        autocast = weights == "autocast"
        frames = sample

        def ours(batch_frames, mode):
            with torch.autocast(device.type, dtype=bf16, enabled=autocast):
                return spatial_features(run_model, batch_frames, mode=mode)

        add("ours streaming", weights, "-", 1,
            measure(lambda: ours(frames[None], "streaming"), 1, device, warmup, iters))
        for impl in args.impls.split(","):
            run_model.causal_impl = impl
            for batch in batch_sizes:
                batched = frames[None].expand(batch, -1, -1, -1, -1).contiguous()
                add("ours batched", weights, impl, batch,
                    measure(lambda: ours(batched, "batched"), batch, device, warmup, iters))
        run_model.causal_impl = "chunked"
        if args.compile:
            compiled = torch.compile(run_model, dynamic=False)
            for batch in batch_sizes:
                batched = frames[None].expand(batch, -1, -1, -1, -1).contiguous()

                def run_compiled(x=batched):
                    with torch.autocast(device.type, dtype=bf16, enabled=autocast):
                        return spatial_features(compiled, x, mode="batched")

                add("ours batched", weights, "compiled", batch,
                    measure(run_compiled, batch, device, warmup + 1, iters))
        if not autocast:
            model = run_model.float()

    result["preprocess"] = preprocess_rate(0.5 if tiny else 2.0)
    best = max(result["rows"], key=lambda r: r["samples_per_s"])
    result["best"] = {k: best[k] for k in ("path", "weights", "impl", "batch", "samples_per_s")}
    result["goal_met"] = None if tiny else best["samples_per_s"] >= GOAL_SAMPLES_PER_S

    print(f"\ndevice: {result['device']}  {args.frames} frames of {height}x{width} per sample "
          f"({'tiny config' if tiny else 'VGGT-1B'})")
    print(f"{'path':>18} {'weights':>9} {'impl':>8} {'batch':>5} {'samples/s':>10} "
          f"{'s/call':>8} {'peak GiB':>8}")
    for r in result["rows"]:
        print(f"{r['path']:>18} {r['weights']:>9} {r['impl']:>8} {r['batch']:>5} "
              f"{r['samples_per_s']:>10.3f} {r.get('s_per_call', float('nan')):>8.3f} "
              f"{r.get('peak_gib', float('nan')):>8.2f} {r.get('error', '')}")
    print(f"decode+preprocess: {result['preprocess']['frames_per_s_per_core']:.1f} frames/s per core")
    verdict = {None: "not judged on CPU", True: "met", False: "NOT met"}[result["goal_met"]]
    print(f"best: {result['best']}; goal {GOAL_SAMPLES_PER_S} samples/s per GPU: {verdict}")
    path = write_json("precompute_tiny.json" if tiny else "precompute.json", result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

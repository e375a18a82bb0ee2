"""The product's micro-step on one GPU, profiled beside the bare language model on the same samples.

    python3 bench/step_profile.py            # one GPU, full size; JSON + table to $OUT or bench/results/
    python3 bench/step_profile.py --tiny     # CPU, tiny models (CI)

One process, one rank. The product side is the trainer's own code: the model as `janus_job.train.trainer`
builds it (`model_from_config` with the spec's checkpointing and the lean layers, random weights
built on the device), the engine from `janus_job.train.engine.build_engine` (the shipped `janus` spec:
ZeRO-1, fused torch AdamW, bf16) and the micro-step `janus_job.train.engine.micro_step` (forward,
`engine.backward`, `engine.step`). The spec's global batch is raised so that no optimizer step
falls inside the profile (one GPU cannot hold the 7B model's Adam state next to the activations;
the optimizer's own cost is in the multi-GPU results). The probe is `bench/llm_probe.py`'s model
(transformers' Qwen2.5-VL-7B language model alone, an LM head, loss on the answer) run on the
same samples' token and answer counts, in the same process, before the product is built.

Samples: `bench/step.py`'s synthetic ones at the official geometry (1..9 images of 391 tokens,
about 82% with 9), features from memory. Each product variant (a change the profile suggested,
see VARIANTS) runs the same samples on the same engine: one warm pass, then `--passes` measured
passes, phases timed with CUDA events (forward, of which the language model, backward, step), no
synchronisation inside a pass. Then `torch.profiler` runs over `--profile-samples` samples of the
probe and of selected variants; the summary lists the top kernels, GPU idle time between
kernels and what the host was doing then, device synchronisations and device-to-host copies with
their Python call sites, and allocator calls. Everything goes into one JSON and a text table.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import gc
import gzip
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import common  # noqa: E402  (bench/common.py)

from janus_job.deploy.launch import ALLOCATOR_DEFAULT  # noqa: E402

# name -> (what changes against the product as it was, prediction written before the run)
VARIANTS = {
    "before": ("the product before this work: mRoPE positions by the model's get_rope_index in every forward "
               "(per-image .item()/.tolist() on device tensors), image grid and counts copied to the GPU and read "
               "back, image tokens counted and scattered (masked_scatter) on the GPU, label positions found by "
               "boolean indexing",
               "reference"),
    "loader_positions": ("positions computed by the collator (janus_job.data.dataset.mrope_position_ids), "
                         "image grid and counts kept on the host",
                         "-5 to -15 ms per micro-step (about 30 syncs and ~100 small launches while the GPU idles)"),
    "no_syncs": ("loader_positions, and image and label positions from the collator "
                 "(janus_job.data.dataset.step_indices): index_copy / index_select instead of masked_scatter / "
                 "boolean indexing, whose forward and "
                 "backward synchronise",
                 "-5 to -10 ms more: the backward starts with the CPU ahead, so DeepSpeed's first-hook host work "
                 "(7 ms) and the per-parameter hooks hide behind the GPU"),
    "stock_layers": ("no_syncs with transformers' own MLP and RMSNorm (janus_job.models.janusvln.lean off)",
                     "-1% time (no recomputed SiLU / norm in backward), +6.6 GiB"),
    "attention_flash": ("no_syncs with PyTorch's flash kernel preferred over cuDNN (torch's own choice here)",
                        "attention is ~8% of the GPU time; cuDNN's Hopper kernel is faster: +1 to +3%"),
    "capped": ("no_syncs with the allocator held to its peak + 7.6 GiB (the headroom the 4-GPU run had under "
               "its 78 GiB cap)",
               "if the 4-GPU runs' gap came from allocator pressure: cudaMalloc/cudaFree calls and a slower step; "
               "with expandable segments, little change"),
    "compiled": ("no_syncs with each decoder layer compiled (janus_job.models.janusvln.compile.compile_decoder_layers, "
                 "dynamic sequence length)",
                 "-10 to -15% of fwd+bwd (the probe's 0.312 -> 0.267 s with static shapes); compile 1-2 min"),
    "compiled_stock": ("compiled, with transformers' own MLP and RMSNorm "
                       "(does compile subsume janus_job.models.janusvln.lean?)",
                       "equal time to compiled; memory between lean and stock (inductor recomputes cheap "
                       "elementwise ops in backward)"),
    "fp8_tensorwise": ("compiled with training.precision fp8, fp8_recipe tensorwise (janus_job.models.janusvln.fp8: "
                       "the q/k/v/o and MLP projections of decoder layers 1..L-2 in float8, one scale per tensor)",
                       "-15 to -25% of compiled's fwd+bwd: ~85% of the matmul FLOPs move to float8 (2x peak), "
                       "matmuls are ~80% of the GPU time, torchao's casts cost some back; memory within 1 GiB"),
    "fp8_rowwise": ("compiled with training.precision fp8, fp8_recipe rowwise (one scale per row)",
                    "-10 to -15% of compiled's: rowwise scaling costs more than tensorwise at 3.8k tokens"),
    "before_again": ("the product before this work, measured again last (drift check)", "equal to before"),
}
PROFILED = ("before", "no_syncs", "compiled")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaStreamWaitEvent")
ALLOC_CALLS = ("cudaMalloc", "cudaFree", "cudaMallocAsync", "cudaFreeAsync", "cuMemCreate", "cuMemMap",
               "cuMemUnmap", "cuMemRelease", "cuMemAddressReserve", "cuMemAddressFree", "cuMemSetAccess",
               "cudaHostAlloc", "cudaFreeHost")
OWN_FRAMES = ("janus_job/", "bench/", "transformers/", "deepspeed/")


# ---------------------------------------------------------------- timing


class Clock:
    """Named spans on the compute stream (CUDA events) or the host clock (CPU); read after a sync."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.open: dict[str, Any] = {}
        self.spans: dict[str, list] = defaultdict(list)

    def mark(self) -> Any:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, name: str) -> None:
        self.open[name] = self.mark()

    def stop(self, name: str) -> None:
        if name in self.open:
            self.spans[name].append((self.open.pop(name), self.mark()))

    def seconds(self) -> dict[str, list[float]]:
        """Per span name, the seconds of each span since the last call (synchronises)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        out = {}
        for name, spans in self.spans.items():
            if self.cuda:
                out[name] = [b.elapsed_time(e) / 1000.0 for b, e in spans]
            else:
                out[name] = [e - b for b, e in spans]
        self.spans = defaultdict(list)
        return out


def timed(clock: Clock, name: str, fn):
    def wrapper(*args, **kwargs):
        clock.start(name)
        try:
            return fn(*args, **kwargs)
        finally:
            clock.stop(name)

    return wrapper


def span_hooks(module, clock: Clock, name: str) -> list:
    return [module.register_forward_pre_hook(lambda *_: clock.start(name)),
            module.register_forward_hook(lambda *_: clock.stop(name))]


# ---------------------------------------------------------------- the samples


def make_batches(args, qwen_config, vggt_config, tiny: bool, pad_to_multiple_of: int = 1) -> list[dict]:
    """The collated micro-batches (one sample each) of `--samples` synthetic samples, with loader
    positions (`position_ids`); the `before` variant drops them. The fp8 variants take them padded to
    16 tokens, as the trainer collates them under training.precision fp8."""
    import step  # bench/step.py

    from janus_job.data import frames
    from janus_job.data.dataset import JanusCollator

    source = step.TINY_SOURCE_SIZE if tiny else step.SOURCE_SIZE
    width = step.TINY_TARGET_WIDTH if tiny else 644
    geometry = frames.frame_geometry(*source, target_width=width)
    setup = step.janus_setup(1, tiny)
    text = qwen_config.text_config
    ids = step.TokenIds(image=qwen_config.image_token_id, vision_start=qwen_config.vision_start_token_id,
                        vision_end=qwen_config.vision_end_token_id, text_low=20,
                        text_high=min(text.vocab_size, 151000))
    samples = step.synthetic_samples(args.samples, seed=args.seed)
    dataset = step.SyntheticDataset(samples, setup, geometry, ids, 2 * vggt_config.embed_dim,
                                    qwen_config.vision_config.hidden_size, source, seed=args.seed)
    collate = JanusCollator(0, image_token_id=qwen_config.image_token_id,
                            spatial_merge_size=qwen_config.vision_config.spatial_merge_size,
                            pad_to_multiple_of=pad_to_multiple_of)
    return [collate([dataset[i]]) for i in range(len(samples))]


def sample_shape(batch: dict) -> dict:
    return {"tokens": int(batch["attention_mask"].sum()), "images": int(batch["images_per_sample"].sum()),
            "labels": int((batch["labels"][:, 1:] != -100).sum())}


# ---------------------------------------------------------------- profiler summary


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for begin, end in sorted(intervals):
        if out and begin <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([begin, end])
    return [(b, e) for b, e in out]


def _frame(name: str) -> str:
    """'…/site-packages/transformers/models/x.py(12): f' -> 'transformers/models/x.py:12 f'."""
    path, _, rest = name.partition("(")
    line, _, func = rest.partition("): ")
    for marker in OWN_FRAMES:
        if marker in path:
            path = marker + path.split(marker, 1)[1]
            break
    return f"{path}:{line.rstrip(')')} {func}".strip()


def _call_site(stack: list[str]) -> str:
    """The innermost frames of the project, transformers or DeepSpeed (else the innermost of all)."""
    own = [f for f in stack if any(m in f for m in OWN_FRAMES) and "step_profile.py" not in f]
    picked = own[-3:] if own else stack[-2:]
    return " <- ".join(_frame(f) for f in reversed(picked)) or "(no Python frame)"


def _kernel_class(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "attention", "cudnn_generated", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "matmul", "gemv")):
        return "matmul"
    if "nccl" in low:
        return "communication"
    if "triton" in low:
        return "triton (compiled)"
    if any(k in low for k in ("reduce", "norm", "softmax", "sum", "mean")):
        return "reduction"
    return "elementwise / other"


def summarize_trace(path: Path, steps: int, top: int = 15) -> dict:
    """The profile summary: top kernels, GPU idle gaps, syncs with call sites, allocator calls (per micro-step)."""
    events = [e for e in json.loads(Path(path).read_text()).get("traceEvents", []) if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    python = [e for e in events if e.get("cat") == "python_function"]
    cpu_ops = [e for e in events if e.get("cat") == "cpu_op"]
    out: dict[str, Any] = {"micro_steps": steps, "events": len(events)}

    # kernels by total time
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_class: Counter = Counter()
    for k in kernels:
        key = k["name"][:120]
        by_name[key][0] += k["dur"] / 1e6
        by_name[key][1] += 1
        by_class[_kernel_class(k["name"]) if k.get("cat") == "kernel" else "memcpy / memset"] += k["dur"] / 1e6
    busy = _merge([(k["ts"], k["ts"] + k["dur"]) for k in kernels])
    busy_s = sum(e - b for b, e in busy) / 1e6
    window_s = (busy[-1][1] - busy[0][0]) / 1e6 if busy else 0.0
    out["gpu"] = {"window_s_per_micro_step": window_s / steps, "busy_s_per_micro_step": busy_s / steps,
                  "idle_s_per_micro_step": (window_s - busy_s) / steps,
                  "idle_share": (window_s - busy_s) / window_s if window_s else None,
                  "kernel_launches_per_micro_step": sum(1 for k in kernels if k.get("cat") == "kernel") / steps}
    out["kernel_classes_s_per_micro_step"] = {c: s / steps for c, s in by_class.most_common()}
    out["top_kernels"] = [{"name": n, "s_per_micro_step": s / steps, "calls_per_micro_step": c / steps,
                           "share_of_busy": s / busy_s if busy_s else None}
                          for n, (s, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]

    # the host's Python stack at any moment, per thread (python_function events nest)
    frames_by_tid: dict[Any, list] = defaultdict(list)
    for p in python:
        frames_by_tid[p.get("tid")].append((p["ts"], p["ts"] + p["dur"], p["name"]))
    starts_by_tid = {}
    for tid, frames in frames_by_tid.items():
        frames.sort()
        starts_by_tid[tid] = [f[0] for f in frames]

    def stack_at(tid: Any, ts: float, end: float | None = None) -> list[str]:
        frames = frames_by_tid.get(tid)
        if not frames:
            return []
        i = bisect.bisect_right(starts_by_tid[tid], ts)
        inside = [f for f in frames[max(0, i - 4000):i] if f[1] >= (end if end is not None else ts)]
        return [f[2] for f in sorted(inside, key=lambda f: (f[0], -f[1]))]

    # synchronisations and device-to-host copies
    d2h = {k.get("args", {}).get("correlation") for k in kernels
           if k.get("cat") == "gpu_memcpy" and "dtoh" in k["name"].lower().replace(" ", "")}
    sites: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    counts: Counter = Counter()
    for r in runtime:
        name = r["name"]
        is_d2h = name.startswith("cudaMemcpy") and r.get("args", {}).get("correlation") in d2h
        if name in SYNC_CALLS and name != "cudaStreamWaitEvent" or is_d2h:
            kind = "D2H copy" if is_d2h else name
            counts[kind] += 1
            site = f"{kind}: {_call_site(stack_at(r.get('tid'), r['ts'], r['ts'] + r['dur']))}"
            sites[site][0] += 1
            sites[site][1] += r["dur"] / 1e6
    out["syncs_per_micro_step"] = {k: v / steps for k, v in counts.items()}
    out["sync_sites"] = [{"site": s, "calls_per_micro_step": c / steps, "host_wait_s_per_micro_step": w / steps}
                         for s, (c, w) in sorted(sites.items(), key=lambda kv: -kv[1][1])[:top]]

    # allocator calls
    alloc: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for r in runtime:
        if r["name"] in ALLOC_CALLS:
            alloc[r["name"]][0] += 1
            alloc[r["name"]][1] += r["dur"] / 1e6
    out["allocator_calls_per_micro_step"] = {n: {"calls": c / steps, "host_s": t / steps}
                                             for n, (c, t) in alloc.items()}

    # the largest GPU idle gaps, and what the host was running when each began
    main_tid = Counter(op.get("tid") for op in cpu_ops).most_common(1)[0][0] if cpu_ops else None
    gaps = sorted(((busy[i + 1][0] - busy[i][1], busy[i][1]) for i in range(len(busy) - 1)), reverse=True)
    gap_sites: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for length, at in gaps:
        if length < 20:  # µs: launch latency, not a host stall
            break
        site = _call_site(stack_at(main_tid, at)) if main_tid is not None else "?"
        gap_sites[site][0] += 1
        gap_sites[site][1] += length / 1e6
    out["idle_gaps_over_20us"] = {"count_per_micro_step": sum(v[0] for v in gap_sites.values()) / steps,
                                  "s_per_micro_step": sum(v[1] for v in gap_sites.values()) / steps}
    out["idle_gap_sites"] = [{"host_at_gap_start": s, "gaps_per_micro_step": c / steps, "s_per_micro_step": t / steps}
                             for s, (c, t) in sorted(gap_sites.items(), key=lambda kv: -kv[1][1])[:top]]
    return out


def trimmed_trace(path: Path, target: Path, limit_bytes: int = 12 * 2**20) -> int | None:
    """The trace without Python frames, gzipped, if it fits `limit_bytes`; returns its size."""
    data = json.loads(Path(path).read_text())
    data["traceEvents"] = [e for e in data.get("traceEvents", []) if e.get("cat") != "python_function"]
    raw = gzip.compress(json.dumps(data).encode(), compresslevel=6)
    if len(raw) > limit_bytes:
        return None
    target.write_bytes(raw)
    return len(raw)


@contextlib.contextmanager
def profiled(enabled: bool, trace: Path):
    if not enabled:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, with_stack=True, record_shapes=False) as prof:
        yield
    prof.export_chrome_trace(str(trace))


# ---------------------------------------------------------------- runs


def run_probe(args, batches, device, clock: Clock, tiny: bool, workdir: Path) -> dict:
    import llm_probe  # bench/llm_probe.py
    import torch

    model, head, config, dtype = llm_probe.build(tiny, device.type)
    model.train()
    params = list(model.parameters()) + [head.weight]
    shapes = [sample_shape(b) for b in batches]
    data = [llm_probe.inputs(config, dtype, device, 1, s["tokens"], s["labels"]) for s in shapes]

    def one(x, positions, labels):
        clock.start("forward")
        loss = llm_probe.forward_loss(model, head, x, positions, labels)
        clock.stop("forward")
        clock.start("backward")
        loss.backward()
        for p in params:
            p.grad = None
        clock.stop("backward")

    for d in data:  # warm
        one(*d)
    clock.seconds()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    passes = []
    for _ in range(args.passes):
        for d in data:
            one(*d)
        passes.append(clock.seconds())
    result = phases(passes, len(data))
    result["peak_gib"] = torch.cuda.max_memory_allocated() / common.GIB if device.type == "cuda" else None
    if args.profile_samples:
        trace = workdir / "trace-probe.json"
        try:
            with profiled(True, trace):
                for d in data[:args.profile_samples]:
                    one(*d)
                clock.seconds()
            result["profile"] = summarize_trace(trace, min(args.profile_samples, len(data)))
        except Exception as err:  # the timings above stand without the profile
            result["profile_error"] = f"{type(err).__name__}: {str(err)[:600]}"
    return result  # the probe's model goes with this frame; main() empties the cache


def phases(passes: list[dict], count: int) -> dict:
    """Seconds per micro-step of each phase, per measured pass (their spread is the noise)."""
    per_pass = []
    for p in passes:
        row = {name: sum(v) / count for name, v in p.items()}
        row["fwd_bwd"] = row.get("forward", 0.0) + row.get("backward", 0.0)
        if "llm_forward" in row:
            row["forward_other"] = row["forward"] - row["llm_forward"]
        if "micro_step" in row:
            row["outside_phases"] = row["micro_step"] - row["fwd_bwd"] - row.get("step", 0.0)
        per_pass.append(row)
    mean = {k: sum(p[k] for p in per_pass) / len(per_pass) for k in per_pass[0]}
    return {"s_per_micro_step": mean, "per_pass": per_pass,
            "fwd_bwd_spread": (max(p["fwd_bwd"] for p in per_pass) - min(p["fwd_bwd"] for p in per_pass))
            / mean["fwd_bwd"] if mean["fwd_bwd"] else None}


def build_product(args, qwen_config, device, tiny: bool):
    """The model and engine exactly as janus_job.train.trainer builds them (random weights on the device)."""
    import torch

    from janus_job.models.janusvln.build import model_from_config
    from janus_job.train.engine import build_engine

    spec = common.default_job_spec("step-profile", 1, tiny=tiny,
                                   overrides=(("training.global_batch_size", args.accumulation),))
    t = spec.training
    dtype = torch.bfloat16 if spec.deepspeed.bf16 and device.type == "cuda" else torch.float32
    torch.manual_seed(1234)
    model = model_from_config(qwen_config, None, dtype=dtype, device=device,
                              attn_implementation=spec.model.attn_implementation,
                              gradient_checkpointing=t.gradient_checkpointing,
                              spatial_channels=2 * vggt_config_of(tiny).embed_dim)
    engine, config = build_engine(spec, model, 1, 100, accumulation=spec.accumulation_for(1))
    return spec, engine, config


def lean_switch(language_model, on: bool) -> int:
    """Turns janus_job.models.janusvln.lean's MLP/RMSNorm on (as built) or off (transformers' own forward)."""
    from janus_job.models.janusvln.lean import make_activation_lean

    if on:
        return make_activation_lean(language_model)
    n = 0
    for module in language_model.modules():
        if "forward" in module.__dict__:
            del module.forward
            n += 1
    return n


def plain_linears(language_model) -> int:
    """Swaps every Float8Linear back for an nn.Linear holding the same Parameters (the next variant
    starts from the bf16 model); returns how many."""
    import torch

    from janus_job.models.janusvln.fp8 import fp8_converted

    count = 0
    for name in fp8_converted(language_model):
        module = language_model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        with torch.device("meta"):
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.weight, plain.bias = module.weight, module.bias
        setattr(language_model.get_submodule(parent_name), child, plain)
        count += 1
    return count


def run_product(args, batches, device, clock: Clock, tiny: bool, workdir: Path, result: dict) -> None:
    import torch

    from janus_job.models.janusvln.compile import compile_decoder_layers
    from janus_job.train.engine import micro_step

    spec, engine, config = build_product(args, qwen_config_of(tiny), device, tiny)
    result["spec"] = {"zero_stage": config["zero_optimization"]["stage"], "bf16": config["bf16"]["enabled"],
                      "gradient_checkpointing": spec.training.gradient_checkpointing,
                      "accumulation": config["gradient_accumulation_steps"], "optimizer": spec.deepspeed.optimizer,
                      "attn_implementation": spec.model.attn_implementation, "lean_activations": True,
                      "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    module = engine.module
    language = module.model.language_model
    span_hooks(module, clock, "forward")
    span_hooks(language, clock, "llm_forward")
    engine.backward = timed(clock, "backward", engine.backward)
    engine.step = timed(clock, "step", engine.step)
    engine.train()
    variants = result.setdefault("variants", {})

    def legacy(batch: dict) -> dict:
        """The batch as the product had it: no loader indices, metadata on the GPU."""
        out = {k: v for k, v in batch.items() if k not in ("position_ids", "image_index", "label_index")}
        for key in ("image_grid_thw", "images_per_sample"):
            out[key] = out[key].to(device)
        return out

    def positions_only(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k not in ("image_index", "label_index")}

    def measure(name: str, prepare, compile_first: bool = False) -> None:
        description, prediction = VARIANTS[name]
        row: dict[str, Any] = {"description": description, "prediction": prediction}
        variants[name] = row
        stats0 = torch.cuda.memory_stats() if device.type == "cuda" else {}
        try:
            data = [prepare(b) for b in batches]
            started = time.perf_counter()
            for batch in data:  # warm (and compile)
                micro_step(engine, batch, device)
            clock.seconds()
            row["warm_pass_s"] = time.perf_counter() - started
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            passes = []
            for _ in range(args.passes):
                for batch in data:
                    clock.start("micro_step")
                    micro_step(engine, batch, device)
                    clock.stop("micro_step")
                passes.append(clock.seconds())
            row.update(phases(passes, len(data)))
            if compile_first:
                row["compile_s"] = row["warm_pass_s"] - row["s_per_micro_step"]["micro_step"] * len(data)
            if device.type == "cuda":
                stats = torch.cuda.memory_stats()
                row["peak_gib"] = torch.cuda.max_memory_allocated() / common.GIB
                row["allocator"] = {k: stats.get(k, 0) - stats0.get(k, 0)
                                    for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}
            if args.profile_samples and name in PROFILED:
                trace = workdir / f"trace-{name}.json"
                with profiled(True, trace):
                    for batch in data[:args.profile_samples]:
                        micro_step(engine, batch, device)
                    clock.seconds()
                row["profile"] = summarize_trace(trace, min(args.profile_samples, len(data)))
                if name == "no_syncs" and args.out_dir:
                    size = trimmed_trace(trace, Path(args.out_dir) / "trace-product.json.gz")
                    row["trace_file"] = "trace-product.json.gz" if size else None
        except Exception as err:  # a variant that fails is reported, the others still run
            import traceback

            row["error"] = f"{type(err).__name__}: {str(err)[:600]}"
            row["traceback"] = traceback.format_exc()[-3000:]
            clock.open.clear()
            clock.seconds()
        print(f"  {name}: {json.dumps(row.get('s_per_micro_step') or row.get('error'))}", flush=True)
        common.write_json_atomic(args.result_path, result)  # a run killed later keeps what it measured

    same = lambda b: b  # noqa: E731
    selected = [v for v in args.variants.split(",") if v]
    unknown = [v for v in selected if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    for name in selected:
        if name in ("before", "before_again"):
            measure(name, legacy)
        elif name == "loader_positions":
            measure(name, positions_only)
        elif name == "no_syncs":
            measure(name, same)
        elif name == "stock_layers":
            lean_switch(language, False)
            measure(name, same)
            lean_switch(language, True)
        elif name == "attention_flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]
            with sdpa_kernel(order, set_priority=True):
                measure(name, same)
        elif name == "capped":
            if device.type == "cuda":
                peak = variants.get("no_syncs", {}).get("peak_gib") or torch.cuda.max_memory_allocated() / common.GIB
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, (peak + 7.6) * common.GIB / total))
            measure(name, same)
            if device.type == "cuda":
                variants[name]["cap_gib"] = peak + 7.6
                torch.cuda.set_per_process_memory_fraction(1.0)
        elif name == "compiled":
            compile_decoder_layers(language, backend=args.compile_backend)
            measure(name, same, compile_first=True)
        elif name.startswith("fp8_"):
            from janus_job.models.janusvln.fp8 import convert_to_fp8

            for layer in language.layers:  # convert eager layers, then compile (the trainer's order)
                layer._compiled_call_impl = None
            plain_linears(language)
            row_names = convert_to_fp8(language, name.removeprefix("fp8_"))
            compile_decoder_layers(language, backend=args.compile_backend)
            padded = iter(args.fp8_batches)
            measure(name, lambda _: next(padded), compile_first=True)
            variants[name]["fp8_linears"] = len(row_names)
            variants[name]["padded_tokens"] = [int(b["input_ids"].shape[1]) for b in args.fp8_batches]
        elif name == "compiled_stock":
            if not any(getattr(layer, "_compiled_call_impl", None) for layer in language.layers):
                compile_decoder_layers(language, backend=args.compile_backend)
            lean_switch(language, False)
            measure(name, same, compile_first=True)
            lean_switch(language, True)
        rest = selected[selected.index(name) + 1:]
        if name.startswith(("compiled", "fp8_")) and not any(r.startswith(("compiled", "fp8_")) for r in rest):
            for layer in language.layers:  # back to eager bf16 for what follows
                layer._compiled_call_impl = None
            plain_linears(language)
    if device.type == "cuda":
        import torch._dynamo.utils as dynamo_utils

        result["dynamo_counters"] = {k: dict(v) for k, v in dynamo_utils.counters.items()
                                     if k in ("stats", "recompiles", "graph_break")}


def qwen_config_of(tiny: bool):
    if tiny:
        from janus_job.demo.tiny import tiny_qwen_config, tiny_tokenizer

        return tiny_qwen_config(tiny_tokenizer(), text_layers=4)  # inner layers for the fp8 variants
    from janus_job.models.flavors import qwen25_vl_7b_config

    return qwen25_vl_7b_config()


def vggt_config_of(tiny: bool):
    if tiny:
        from janus_job.demo.tiny import tiny_vggt_config

        return tiny_vggt_config()
    from janus_job.models.vggt import VGGTAggregatorConfig

    return VGGTAggregatorConfig()


# ---------------------------------------------------------------- report


def table(result: dict) -> str:
    probe = result["probe"]["s_per_micro_step"]
    lines = [f"step_profile on {result['card']} ({result['samples']} samples, mean {result['mean_tokens']:.0f} tokens; "
             "seconds per micro-step)",
             f"{'variant':18s} {'fwd':>7s} {'llm fwd':>7s} {'fwd oth':>7s} {'bwd':>7s} {'step':>7s} "
             f"{'fwd+bwd':>7s} {'/probe':>6s} {'/before':>7s} {'spread':>6s} {'peak GiB':>8s}",
             f"{'probe (bare LLM)':18s} {probe['forward']:7.4f} {'':>7s} {'':>7s} {probe['backward']:7.4f} "
             f"{'':>7s} {probe['fwd_bwd']:7.4f} {1:6.3f} {'':>7s} {fmt_pct(result['probe']['fwd_bwd_spread']):>6s} "
             f"{common.fmt(result['probe'].get('peak_gib'), '.1f'):>8s}"]
    before = result["variants"].get("before", {}).get("s_per_micro_step", {}).get("fwd_bwd")
    for name, row in result["variants"].items():
        s = row.get("s_per_micro_step")
        if not s:
            lines.append(f"{name:18s} error: {row.get('error', '?')[:90]}")
            continue
        lines.append(
            f"{name:18s} {s['forward']:7.4f} {s['llm_forward']:7.4f} {s['forward_other']:7.4f} {s['backward']:7.4f} "
            f"{s.get('step', 0):7.4f} {s['fwd_bwd']:7.4f} {s['fwd_bwd'] / probe['fwd_bwd']:6.3f} "
            f"{s['fwd_bwd'] / before if before else float('nan'):7.3f} {fmt_pct(row['fwd_bwd_spread']):>6s} "
            f"{common.fmt(row.get('peak_gib'), '.1f'):>8s}"
            + (f"  compile {row['compile_s']:.0f}s" if "compile_s" in row else ""))
    for name, row in [("probe", result["probe"])] + list(result["variants"].items()):
        prof = row.get("profile")
        if not prof:
            continue
        gpu = prof["gpu"]
        allocs = {k: v["calls"] for k, v in prof["allocator_calls_per_micro_step"].items()}
        lines.append(f"-- profile {name}: GPU busy {gpu['busy_s_per_micro_step']:.4f} s, idle "
                     f"{gpu['idle_s_per_micro_step']:.4f} s ({fmt_pct(gpu['idle_share'])}) per micro-step, "
                     f"{gpu['kernel_launches_per_micro_step']:.0f} kernels; "
                     f"syncs {json.dumps(prof['syncs_per_micro_step'])}; alloc {json.dumps(allocs)}")
        classes = prof["kernel_classes_s_per_micro_step"]
        lines.append("   classes: " + ", ".join(f"{k} {v:.4f}" for k, v in classes.items()))
        for k in prof["top_kernels"][:6]:
            lines.append(f"   {k['s_per_micro_step']:.4f} s x{k['calls_per_micro_step']:.0f}  {k['name'][:90]}")
        for s in prof["sync_sites"][:5]:
            lines.append(f"   sync {s['calls_per_micro_step']:.0f}x {s['host_wait_s_per_micro_step'] * 1e3:.2f} ms  "
                         f"{s['site'][:110]}")
        for g in prof["idle_gap_sites"][:4]:
            lines.append(f"   idle {g['s_per_micro_step'] * 1e3:.2f} ms in {g['gaps_per_micro_step']:.0f} gaps, "
                         f"host at {g['host_at_gap_start'][:100]}")
    return "\n".join(lines)


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny models (CI)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--passes", type=int, default=2, help="measured passes over the samples per variant")
    parser.add_argument("--profile-samples", type=int, default=2, help="micro-steps under torch.profiler (0: none)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--accumulation", type=int, default=4096,
                        help="the spec's global batch at one GPU: no optimizer step inside the profile")
    parser.add_argument("--seed", type=int, default=11, help="10 samples of seed 11: 1, 5, 7 and seven 9-image")
    parser.add_argument("--out", help="output folder (default $OUT, else bench/results)")
    parser.add_argument("--tag", default="step_profile")
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_DEFAULT)  # what janus-job launch sets
    import torch

    from janus_job.train.distributed import init_distributed

    tiny = args.tiny or not torch.cuda.is_available()
    if tiny:
        args.samples = min(args.samples, 3)
    _, device = init_distributed()
    card = common.card_name()
    path = common.results_path(card, 1, args.out, prefix="tiny-" if tiny else "", tag=args.tag)
    args.out_dir, args.result_path = str(path.parent), path
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"step_profile-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    clock = Clock(device.type == "cuda")
    qwen_config = qwen_config_of(tiny)
    batches = make_batches(args, qwen_config, vggt_config_of(tiny), tiny)
    if any(v.startswith("fp8_") for v in args.variants.split(",")):
        from janus_job.models.janusvln.fp8 import FP8_MULTIPLE

        args.fp8_batches = make_batches(args, qwen_config, vggt_config_of(tiny), tiny, FP8_MULTIPLE)
    shapes = [sample_shape(b) for b in batches]
    import transformers

    result: dict[str, Any] = {
        "card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": transformers.__version__, "tiny": tiny,
        "samples": len(batches), "sample_shapes": shapes,
        "mean_tokens": sum(s["tokens"] for s in shapes) / len(shapes), "passes": args.passes,
    }
    try:
        import deepspeed

        result["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    print(f"step_profile on {card}: {len(batches)} samples, images {[s['images'] for s in shapes]}, "
          f"tokens {[s['tokens'] for s in shapes]}", flush=True)
    started = time.perf_counter()
    result["probe"] = run_probe(args, batches, device, clock, tiny, workdir)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"  probe: {json.dumps(result['probe']['s_per_micro_step'])}", flush=True)
    result["probe_s"] = time.perf_counter() - started
    common.write_json_atomic(path, result)
    try:
        run_product(args, batches, device, clock, tiny, workdir, result)
    finally:
        result["total_s"] = time.perf_counter() - started
        probe = result["probe"]["s_per_micro_step"]["fwd_bwd"]
        for row in result.get("variants", {}).values():
            if row.get("s_per_micro_step"):
                row["fwd_bwd_vs_probe"] = row["s_per_micro_step"]["fwd_bwd"] / probe
        common.write_json_atomic(path, result)
    text = table(result)
    print(text, flush=True)
    path.with_suffix(".txt").write_text(text + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

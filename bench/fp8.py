"""FP8 against bf16 in the product trainer: loss curves from the same initialisation and data, step time, memory.

Each run is `torchrun -m janus_job.cli train` on a spec that differs from the others only in
`training.precision` / `training.fp8_recipe` (RUNS); the weights, the data, the seed and hence
the sample order are the same, so the per-step losses can be compared step by step. Stages,
each a process with a time limit (bench/train_full.py's runner, as bench/data_wait.py uses it):

1. `dataset`: synthetic trajectories in JanusVLN's annotation format (janus_job.demo.run);
2. `checkpoints`: per --size, random weights:
   - `full`: Qwen2.5-VL-7B's widths with --text-layers decoder layers (one GPU: 14) and a VGGT-1B
     aggregator, built on the GPU (`bench/train_full.py _checkpoints`);
   - `small`: the tiny encoders with a 1024-wide, 8-layer language model (six layers in float8);
   - `tiny` (CPU, CI): the tiny encoders with a 64-wide, 4-layer language model;
3. `precompute`: `janus-job precompute` fills a file:// store with the encoders' features;
4. one trainer run per RUNS entry: ZeRO-1, fused torch AdamW, micro batch 1, --accumulation
   micro-batches, --steps steps, a log line (and metrics record) at every step; at full size
   `training.compile` for every run (float8's casts are fused by compile; bf16 compiled is today's
   fastest), eager for the small and tiny models (their loss curves are the point).

The check, written before any fp8 run: over the last half of the steps (at most 50), the mean fp8
loss is within TOLERANCE (relative) of the mean bf16 loss over the same steps; the mean and the
largest per-step relative difference are reported beside it. Speed is the mean s/it after --skip-steps
(compilation and the first allocations left out); memory is the trainer's own `mem_max` (the
largest allocator peak of any rank).

    python3 bench/fp8.py --size small --steps 300                  # 1 x H100/H200, ~4 min
    python3 bench/fp8.py --size full --steps 40                     # 1 x H100/H200, 14 layers, ~6 min
    python3 bench/fp8.py --tiny                                     # CPU (tests/test_bench_fp8.py)

On a CPU torch's float8 matmul is a slow reference implementation (several times bf16's time even on
the tiny model): --tiny checks the plumbing and the comparison, not the speed.

JSON: `<out or $OUT or bench/results>/fp8-<date>-<card>-1-<size>.json` with the spec changes, the
start lines, every run's per-step records and the comparison; the stages' logs beside it. Exit 0
when every fp8 run is within the tolerance, 1 when one is not, 2 when a stage failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_full  # noqa: E402  (bench/train_full.py: stages, stage runner, the job spec)
from common import print_table, results_path, write_json_atomic  # noqa: E402
from data_wait import FABRIC_ENV  # noqa: E402

TOLERANCE = 0.02  # relative difference of the mean losses over the last half of the steps (at most 50)
WINDOW = 50
RUNS = {
    "bf16": ({"precision": "bf16"}, "bf16 (the default)"),
    "fp8_tensorwise": ({"precision": "fp8", "fp8_recipe": "tensorwise"},
                       "float8 decoder linears, one scale per tensor"),
    "fp8_rowwise": ({"precision": "fp8", "fp8_recipe": "rowwise"}, "float8 decoder linears, one scale per row"),
}
SMALL = {"text_hidden": 1024, "text_layers": 8}
SMALL_EPISODES = 16  # 192 samples: 300 steps of 4 are ~6 epochs, the loss does not collapse to ~0
TINY = {"text_hidden": 64, "text_layers": 4}
LIMIT_S = {"checkpoints": 200, "precompute": 150, "train": 300}


def make_models(workdir: Path, args: argparse.Namespace, env: dict, limit: Any) -> dict:
    """The checkpoints of --size; returns train_full's facts dict (qwen, vggt, card, gpu_memory_gib)."""
    if args.size == "full":
        info = workdir / "checkpoints.json"
        command = [sys.executable, train_full.__file__, "_checkpoints", "--workdir", str(workdir), "--info", str(info),
                   "--text-layers", str(args.text_layers)]
        train_full.run_stage("checkpoints", command, env, limit("checkpoints"), workdir / "logs")
        return json.loads(info.read_text())
    import torch

    from janus_job.demo.run import write_tiny_models

    shape = SMALL if args.size == "small" else TINY
    qwen_dir, vggt_path = write_tiny_models(workdir / "models", **shape)
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"qwen": str(qwen_dir), "vggt": str(vggt_path), "card": card, "gpu_memory_gib": 100_000,
            "language_model": shape}


def run_spec(base: dict, run: str, args: argparse.Namespace) -> dict:
    spec = json.loads(json.dumps(base))
    spec["name"] = "fp8-bench"
    spec["training"].update(export=False, log_interval=1, max_steps=args.steps, compile=args.compile,
                            warmup_ratio=0.05, learning_rate=args.learning_rate, **RUNS[run][0])
    spec["data"].update(num_workers=0 if args.size == "tiny" else 4, persistent_workers=args.size != "tiny")
    if args.size == "tiny":  # torch's CPU float8 matmul is a slow reference: the demo's 112 px frames
        from janus_job.demo.run import DEMO_FRAME_WIDTH

        spec["data"].update(frame_width=DEMO_FRAME_WIDTH, min_pixels=4 * 28 * 28)
    # the fit check estimates the 28-layer 7B; these models are smaller (they fit: the run shows it)
    spec["cluster"]["resources"]["gpu_memory_gib"] = 100_000
    return spec


def run_summary(records: list[dict], skip: int) -> dict:
    steps = [r for r in records if r["step"] > skip]
    if not steps:
        return {"steps": 0}
    return {"steps": len(steps), "s_per_it": sum(r["s_per_it"] for r in steps) / len(steps),
            "samples_per_s": sum(r["samples_per_s"] for r in steps) / len(steps),
            "mem_max_gib": max((r["mem_max_gib"] for r in steps if r.get("mem_max_gib") is not None), default=None),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"]}


def compare(reference: list[dict], other: list[dict]) -> dict:
    """Step-by-step loss difference of `other` against `reference` over their common steps."""
    ref = {r["step"]: r["loss"] for r in reference}
    pairs = [(ref[r["step"]], r["loss"]) for r in other if r["step"] in ref]
    if not pairs:
        return {"compared_steps": 0, "within_tolerance": False}
    window = pairs[-min(WINDOW, max(1, len(pairs) // 2)):]
    rel = [abs(b - a) / abs(a) for a, b in window]
    every = [abs(b - a) / abs(a) for a, b in pairs]
    reference_mean, mean = sum(a for a, _ in window) / len(window), sum(b for _, b in window) / len(window)
    window_diff = abs(mean - reference_mean) / abs(reference_mean)
    return {"compared_steps": len(pairs), "window_steps": len(window), "window_mean_bf16": reference_mean,
            "window_mean": mean, "window_mean_rel_diff": window_diff, "mean_rel_diff": sum(rel) / len(rel),
            "max_rel_diff_window": max(rel), "max_rel_diff_all": max(every), "tolerance": TOLERANCE,
            "within_tolerance": window_diff < TOLERANCE}


def orchestrate(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    workdir = train_full.new_workdir(args.workdir, "fp8-")
    env = {**train_full.child_env(workdir), **FABRIC_ENV}
    limit = train_full.stage_limits(args.budget_s, lambda stage: LIMIT_S.get(stage, LIMIT_S["train"]))
    report: dict[str, Any] = {
        "bench": "fp8", "size": args.size, "command": "python3 bench/fp8.py " + " ".join(argv),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpus": 1, "card": "cpu" if args.tiny else None, "versions": train_full._versions(),
        "tolerance": {"window_mean_rel_diff_below": TOLERANCE, "over": f"the last half of the steps, at most {WINDOW}"},
        "skip_steps": args.skip_steps, "status": "running", "stages_s": {}, "runs": {},
    }
    stage = "dataset"
    try:
        t0 = time.perf_counter()
        from janus_job.demo.run import synthesize_dataset

        if args.tiny:  # the tiny encoders at the demo's 112 px frames
            annotations = synthesize_dataset(workdir / "data")
        else:  # JanusVLN's frame size, 12 samples (1..9 frames) per episode
            annotations = synthesize_dataset(workdir / "data", episodes=args.episodes, frame_size=train_full.FRAME_SIZE,
                                             steps=train_full.STEPS_PER_EPISODE)
        report["samples"] = len(json.loads(annotations.read_text()))
        report["stages_s"]["dataset"] = time.perf_counter() - t0

        stage = "checkpoints"
        t0 = time.perf_counter()
        models = make_models(workdir, args, env, limit)
        report["stages_s"]["checkpoints"] = time.perf_counter() - t0
        report["checkpoints"], report["card"] = models, models["card"]

        stage = "spec"
        base = train_full.job_spec(workdir, annotations, models, args, "precomputed")
        specs = {run: run_spec(base, run, args) for run in args.runs}
        paths = {run: workdir / f"job-{run}.yaml" for run in args.runs}
        for run in args.runs:
            train_full.write_spec(paths[run], specs[run])
        report["spec"] = specs[args.runs[0]]

        stage = "precompute"
        report["stages_s"][stage] = train_full.precompute_store(paths[args.runs[0]], env, limit(stage),
                                                                 workdir / "logs")

        for run in args.runs:
            stage = f"train-{run}"
            lines, wall, records = train_full.train_run(stage, paths[run], 1, env, limit("train"), workdir)
            report["stages_s"][stage] = wall
            report["runs"][run] = {
                "description": RUNS[run][1], "changes": RUNS[run][0], "wall_s": wall,
                "start_line": next((line for line in lines if line.startswith("train start ")), None),
                "records": records, "summary": run_summary(records, args.skip_steps),
            }
            write_json_atomic(result_file(args, report["card"]), report)  # a killed run keeps what it measured
    except Exception as err:  # a failed stage (or anything else) still ends in a JSON naming the stage
        train_full.record_failure(report, stage, err)
    report["wall_s"] = time.perf_counter() - started

    runs = report["runs"]
    if "bf16" in runs:
        base = runs["bf16"]["summary"]
        for run, row in runs.items():
            if run == "bf16":
                continue
            row["vs_bf16"] = compare(runs["bf16"]["records"], row["records"])
            if base.get("s_per_it") and row["summary"].get("s_per_it"):
                row["vs_bf16"]["speedup"] = base["s_per_it"] / row["summary"]["s_per_it"]
            if base.get("mem_max_gib") is not None and row["summary"].get("mem_max_gib") is not None:
                row["vs_bf16"]["mem_max_gib_delta"] = row["summary"]["mem_max_gib"] - base["mem_max_gib"]
    if runs:
        table = [{"run": run, **r["summary"], **r.get("vs_bf16", {})} for run, r in runs.items()]
        print_table(table, [("run", "run"), ("steps", "steps"), ("s_per_it", "s/it"), ("speedup", "x bf16"),
                            ("mem_max_gib", "mem GiB"), ("first_loss", "loss first"), ("last_loss", "loss last"),
                            ("window_mean_rel_diff", "window mean diff"), ("mean_rel_diff", "mean step diff"),
                            ("max_rel_diff_all", "max step diff")],
                    title=f"fp8 vs bf16 in the trainer on {report['card']} ({args.size}, {args.steps} steps)")
    if report["status"] != "failed":
        compared = [r["vs_bf16"] for r in runs.values() if "vs_bf16" in r]
        passed = bool(compared) and all(c["within_tolerance"] for c in compared)
        report["status"] = "passed" if passed else "over_tolerance"
        print(f"fp8 mean loss within {100 * TOLERANCE:.0f}% of bf16's over the window: {'PASS' if passed else 'FAIL'}",
              flush=True)
    path = result_file(args, report["card"] or "unknown")
    train_full.finish_report(path, report, workdir, args)
    return {"passed": 0, "over_tolerance": 1}.get(report["status"], 2)


def result_file(args: argparse.Namespace, card: str) -> Path:
    return results_path(card, 1, args.out, prefix="fp8-", tag=args.size)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "small", "full"), help="models (default small; --tiny: tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (CI): --size tiny")
    parser.add_argument("--runs", help=f"comma-separated, of {', '.join(RUNS)}; bf16 first (default: all; "
                        "tiny: bf16,fp8_tensorwise)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: small 300, full 40, tiny 4)")
    parser.add_argument("--skip-steps", type=int, help="first steps left out of the speed (default 3; tiny 1)")
    parser.add_argument("--episodes", type=int, help="synthetic episodes of 12 samples (default: small 16, full 2)")
    parser.add_argument("--accumulation", type=int, help="micro-batches per step (default 4; tiny 2)")
    parser.add_argument("--learning-rate", type=float, help="default 2e-5 (the spec's); tiny 1e-4")
    parser.add_argument("--text-layers", type=int, default=14, help="--size full: decoder layers of the 7B")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="training.compile of every run (default: on at full size; small and tiny: off, the "
                        "loss curves are their point)")
    parser.add_argument("--budget-s", type=float, default=560.0, help="wall-clock limit of the whole run")
    parser.add_argument("--workdir", help="empty directory for models, data, store (kept)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp work directory")
    parser.add_argument("--out", help="result folder (default $OUT, else bench/results)")
    args = parser.parse_args(argv)
    args.size = "tiny" if args.tiny else (args.size or "small")
    args.tiny = args.size == "tiny"
    args.steps = args.steps or {"tiny": 4, "small": 300, "full": 40}[args.size]
    args.accumulation = args.accumulation or (2 if args.tiny else 4)
    args.episodes = args.episodes or (SMALL_EPISODES if args.size == "small" else train_full.EPISODES)
    args.skip_steps = (1 if args.tiny else 3) if args.skip_steps is None else args.skip_steps
    args.learning_rate = args.learning_rate or (1e-4 if args.tiny else 2e-5)
    args.compile = args.size == "full" if args.compile is None else args.compile
    args.runs = (args.runs or ("bf16,fp8_tensorwise" if args.tiny else ",".join(RUNS))).split(",")
    unknown = [run for run in args.runs if run not in RUNS]
    if unknown or args.runs[0] != "bf16":
        parser.error(f"--runs: bf16 first, then any of {', '.join(RUNS)} (got {args.runs})")
    # what bench/train_full.job_spec reads
    args.gpus, args.global_batch = 1, args.accumulation
    args.gradient_checkpointing, args.zero_stage = False, 1
    os.environ.update(FABRIC_ENV)
    return orchestrate(args, argv)


if __name__ == "__main__":
    sys.exit(main())

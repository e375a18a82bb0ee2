"""The trainer's own data wait at full size: the product trainer on a file:// store, loader settings side by side.

The figure is the one the trainer's log line prints (`data_wait`: the share of each interval the
slowest rank's training thread was blocked taking its next micro-batch, the copy to the GPU
included; janus_job.train.batches), read from the trainer's metrics records. Stages, each a process
with a time limit (bench/train_full.py's stage runner and stages, reused):

1. `dataset`: synthetic trajectories of 640x480 frames in JanusVLN's annotation format
   (janus_job.demo.run's synthesiser; 24 samples with 1..9 frames);
2. `checkpoints`: a random-weight Qwen2.5-VL-7B, initialised on the GPU in bf16 and saved, and a
   random VGGT-1B aggregator (`bench/train_full.py _checkpoints`); `--text-layers N` keeps every
   width of the 7B and stacks N decoder layers (one GPU: 28 layers' weights, gradients and
   optimizer state take ~145 GiB on a single rank, more than an H200 has; half the layers halve
   the step, so the loader must deliver twice the samples/s: a stricter test of the data wait);
3. `precompute`: `janus-job precompute` fills the file:// store from the frames (the real encoders);
4. one `torchrun --nproc-per-node G -m janus_job.cli train` per `--runs` entry, on specs that differ
   only in the loader settings (RUNS): ZeRO-1, fused torch AdamW, bf16, no gradient checkpointing,
   micro batch 1, accumulation --accumulation, --steps steps, log line at every step; the store
   holds 24 samples, so an epoch ends every few steps (each a loader restart point).

Per run: the wait over the steps after --skip-steps (the first ones start the loader workers and
allocate the optimizer state), as the share of their wall time (sum of data_wait x s/it over sum
of s/it), and the worst step. The check: the `default` run waits < WAIT_GOAL.

    python3 bench/data_wait.py --gpus 2                      # 2 x H200, ~5 min
    python3 bench/data_wait.py --gpus 1 --text-layers 14     # 1 x H200, ~4 min
    python3 bench/data_wait.py --tiny                        # CPU, tiny models (tests/test_bench_data_wait.py)

JSON: `<out or $OUT or bench/results>/data_wait-<date>-<card>-<gpus>[-tiny].json` with every run's
spec changes, start line, log lines and per-step records; the stages' logs beside it. Exit 0 when the
check passed, 1 when it did not, 2 when a stage failed (the JSON names it).
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

WAIT_GOAL = 0.01
# Loader settings per run, over the spec's defaults (janus_job.config.spec.DataSpec).
RUNS = {
    "train_full_loader": ({"num_workers": 2, "persistent_workers": False, "prefetch_batches": 0},
                          "bench/train_full.py's loader: 2 workers, restarted every epoch, no prefetch"),
    "no_prefetch": ({"prefetch_batches": 0}, "the spec's loader defaults with data.prefetch_batches 0"),
    "default": ({}, "the spec's loader defaults (prefetch to the GPU on)"),
}
LOADER_FIELDS = ("num_workers", "pin_memory", "prefetch_factor", "persistent_workers", "prefetch_batches")
TINY_MAX_WORKERS = 2  # CI runs on a few cores
LIMIT_S = {"checkpoints": 200, "precompute": 150, "train": 200}
# Every child runs with these (no NVLink multicast/NVLS on the lent machines).
FABRIC_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def loader_settings(run: str, tiny: bool, gpu: bool) -> dict:
    """The data.* loader fields of a run: the spec's defaults, then the run's changes."""
    from janus_job.config.spec import DataSpec

    settings = {name: DataSpec.model_fields[name].default for name in LOADER_FIELDS}
    settings.update(RUNS[run][0])
    settings["pin_memory"] = settings["pin_memory"] and gpu
    if tiny:
        settings["num_workers"] = min(settings["num_workers"], TINY_MAX_WORKERS)
    return settings


def run_spec(base: dict, run: str, args: argparse.Namespace, models: dict) -> dict:
    spec = json.loads(json.dumps(base))
    spec["name"] = "data-wait"
    spec["data"].update(loader_settings(run, args.tiny, not args.tiny))
    spec["training"].update(export=False, log_interval=1, max_steps=args.steps)
    if models.get("qwen_text_layers") not in (None, 28):
        # the fit check estimates the 28-layer 7B; this model has fewer layers (it fits: the run shows it)
        spec["cluster"]["resources"]["gpu_memory_gib"] = 100_000
    return spec


def wait_summary(records: list[dict], skip: int) -> dict:
    """The trainer's data_wait over the steps after `skip`: time-weighted share and worst step."""
    steps = sorted((r for r in records if r.get("event") == "train" and r["step"] > skip), key=lambda r: r["step"])
    if not steps:
        return {"steps": 0, "data_wait": None, "worst": None}
    seconds = sum(r["s_per_it"] for r in steps)
    waited = sum(r["data_wait"] * r["s_per_it"] for r in steps)
    worst = max(steps, key=lambda r: r["data_wait"])
    return {"steps": len(steps), "first_step": steps[0]["step"], "data_wait": waited / seconds,
            "worst": worst["data_wait"], "worst_step": worst["step"], "s_per_it": seconds / len(steps),
            "samples_per_s": sum(r["samples_per_s"] for r in steps) / len(steps),
            "mfu": None if steps[-1].get("mfu") is None else sum(r["mfu"] for r in steps) / len(steps),
            "mem_max_gib": max((r["mem_max_gib"] for r in steps if r.get("mem_max_gib") is not None), default=None)}


def orchestrate(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    workdir = train_full.new_workdir(args.workdir, "data-wait-")
    env = {**train_full.child_env(workdir), **FABRIC_ENV}
    limit = train_full.stage_limits(
        args.budget_s, lambda stage: train_full.TINY_LIMIT_S if args.tiny else LIMIT_S[stage])

    report: dict[str, Any] = {
        "bench": "data_wait",
        "tiny": args.tiny,
        "command": "python3 bench/data_wait.py " + " ".join(argv),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpus": args.gpus,
        "card": "cpu" if args.tiny else None,
        "versions": train_full._versions(),
        "wait_goal": WAIT_GOAL,
        "skip_steps": args.skip_steps,
        "status": "running",
        "stages_s": {},
        "runs": {},
    }
    stage = "dataset"
    try:
        t0 = time.perf_counter()
        annotations = train_full.make_dataset(workdir / "data", args.tiny)
        report["stages_s"]["dataset"] = time.perf_counter() - t0
        report["samples"] = len(json.loads(annotations.read_text()))

        stage = "checkpoints"
        info = workdir / "checkpoints.json"
        command = [sys.executable, train_full.__file__, "_checkpoints", "--workdir", str(workdir), "--info", str(info)]
        command += ["--tiny"] if args.tiny else []
        command += ["--text-layers", str(args.text_layers)] if args.text_layers else []
        _, report["stages_s"]["checkpoints"] = train_full.run_stage(stage, command, env, limit(stage), workdir / "logs")
        models = json.loads(info.read_text())
        report["checkpoints"] = models
        report["card"] = models["card"]

        stage = "spec"
        base = train_full.job_spec(workdir, annotations, models, args, "precomputed")
        specs = {run: run_spec(base, run, args, models) for run in args.runs}
        paths = {run: workdir / f"job-{run}.yaml" for run in args.runs}
        for run in args.runs:
            train_full.write_spec(paths[run], specs[run])
        report["spec"] = specs[args.runs[-1]]
        report["fit_check"] = train_full.fit_estimates({run: paths[run] for run in args.runs[:1]})

        stage = "precompute"
        report["stages_s"][stage] = train_full.precompute_store(paths[args.runs[0]], env, limit(stage),
                                                                 workdir / "logs")

        for run in args.runs:
            stage = f"train-{run}"
            lines, wall, records = train_full.train_run(stage, paths[run], args.gpus, env, limit("train"), workdir)
            report["stages_s"][stage] = wall
            report["runs"][run] = {
                "description": RUNS[run][1],
                "loader": {name: specs[run]["data"][name] for name in LOADER_FIELDS},
                "wall_s": wall,
                "start_line": next((line for line in lines if line.startswith("train start ")), None),
                "log_lines": [line for line in lines if train_full.LOG_LINE.match(line)],
                "records": records,
                "summary": wait_summary(records, args.skip_steps),
            }
            write_json_atomic(results_path(report["card"], args.gpus, args.out, prefix="data_wait-",
                                           tag="tiny" if args.tiny else ""), report)  # a killed run keeps these
    except Exception as err:  # a failed stage (or anything else) still ends in a JSON naming the stage
        train_full.record_failure(report, stage, err)
    report["wall_s"] = time.perf_counter() - started

    if report["runs"]:
        rows = [{"run": run, **{k: r["loader"][k] for k in ("num_workers", "persistent_workers", "prefetch_batches")},
                 **r["summary"]} for run, r in report["runs"].items()]
        for row in rows:
            row["wait_pct"] = None if row["data_wait"] is None else 100 * row["data_wait"]
            row["worst_pct"] = None if row["worst"] is None else 100 * row["worst"]
        print_table(rows, [("run", "run"), ("num_workers", "workers"), ("persistent_workers", "persistent"),
                           ("prefetch_batches", "prefetch"), ("steps", "steps"), ("wait_pct", "data wait %"),
                           ("worst_pct", "worst step %"), ("s_per_it", "s/it"), ("samples_per_s", "samples/s"),
                           ("mfu", "mfu")],
                    title=f"trainer data wait on {args.gpus} x {report['card']} (steps after {args.skip_steps})")
    if report["status"] != "failed":
        default = report["runs"].get("default", {}).get("summary", {}).get("data_wait")
        passed = default is not None and default < WAIT_GOAL
        report["check"] = {"run": "default", "data_wait": default, "goal": WAIT_GOAL, "passed": passed,
                           "applies": "default" in report["runs"]}
        report["status"] = "passed" if passed or "default" not in report["runs"] else "wait_over_goal"
        if default is not None:
            print(f"default loader: data wait {100 * default:.2f}% (goal < {100 * WAIT_GOAL:.0f}%): "
                  f"{'PASS' if passed else 'FAIL'}", flush=True)
    path = results_path(report["card"] or "unknown", args.gpus, args.out, prefix="data_wait-",
                        tag="tiny" if args.tiny else "")
    train_full.finish_report(path, report, workdir, args)
    return {"passed": 0, "wait_over_goal": 1}.get(report["status"], 2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=None, help="ranks (default 2; --tiny: 1 CPU process)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (CI)")
    parser.add_argument("--runs", default=None,
                        help=f"comma-separated, of {', '.join(RUNS)} (default: all; --tiny: default)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 20; tiny 3)")
    parser.add_argument("--skip-steps", type=int, help="first steps left out of the summary (default 2; tiny 1)")
    parser.add_argument("--accumulation", type=int, help="micro-batches per rank per step (default 4; tiny 2)")
    parser.add_argument("--text-layers", type=int, help="decoder layers of the 7B (default 28; one GPU: 14)")
    parser.add_argument("--budget-s", type=float, default=560.0, help="wall-clock limit of the whole run")
    parser.add_argument("--workdir", help="empty directory for models, data, store (kept)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp work directory")
    parser.add_argument("--out", help="result folder (default $OUT, else bench/results)")
    args = parser.parse_args(argv)
    args.gpus = args.gpus or (1 if args.tiny else 2)
    args.steps = args.steps or (3 if args.tiny else 20)
    args.accumulation = args.accumulation or (2 if args.tiny else 4)
    args.skip_steps = (1 if args.tiny else 2) if args.skip_steps is None else args.skip_steps
    args.runs = (args.runs or ("default" if args.tiny else ",".join(RUNS))).split(",")
    unknown = [run for run in args.runs if run not in RUNS]
    if unknown:
        parser.error(f"unknown --runs {unknown}; choose from {', '.join(RUNS)}")
    if args.text_layers is None and args.gpus == 1 and not args.tiny:
        args.text_layers = 14
    # what bench/train_full.job_spec reads
    args.global_batch = args.gpus * args.accumulation
    args.gradient_checkpointing = False
    args.zero_stage = 1
    os.environ.update(FABRIC_ENV)
    return orchestrate(args, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Full-size trainer check: loss from precomputed features vs online encoders, through the product.

The GPU acceptance point: the full-size JanusVLN model (random weights) trained on 1-2 GPUs
with DeepSpeed gives the same loss on the same batch whether its encoder outputs come from the
feature store or are computed in the step (rel. error <= 1e-2 in bf16), and the trainer's log line
appears with a plausible MFU. Everything runs through the real product path, each stage a separate
process with a time limit (a hang fails that stage by name):

1. `checkpoints`: a random-weight Qwen2.5-VL-7B directory (built on the GPU in bf16, saved as
   safetensors, with janus_job.demo.tiny's offline tokenizer and image processor: the real Qwen
   tokenizer is not available, so the config's special-token ids are those of that tokenizer) and
   a seeded random VGGT-1B aggregator `model.safetensors` (`aggregator.*` keys);
2. `dataset`: two synthetic trajectories of 640x480 frames in JanusVLN's annotation format
   (janus_job.demo.run's synthesiser; 24 samples with 1..9 frames);
3. `precompute`: `python -m janus_job.cli precompute` fills a file:// store (spatial + vision);
4. `train-precomputed`, `train-online`: `torchrun --nproc-per-node N -m janus_job.cli train` on two
   job specs that differ only in `features.mode` and `features.cache_vision` (which the spec
   requires false in online mode) (same seed, checkpoints, data; ZeRO-2, torch fused AdamW, bf16,
   log_interval 1, JANUS_METRICS_FILE);
5. compare the loss of step 1 (the same global batch in both runs: the sampler is seeded; bound
   1e-2 in bf16, 1e-6 in fp32) and check the last step's MFU is plausible (2-75%, GPU only),
   print a table, write JSON to `$OUT/train_full-<date>-<card>-<gpus>.json` (else bench/results/)
   with the stages' logs beside it. Exit 0 passed, 1 loss/MFU check failed, 2 a stage failed (the
   JSON names it). Every stage also ends by --budget-s, so the JSON is written inside the device's
   10-minute command limit.

Memory (a projection, which the JSON's measured mem_max settles): bench/step.py measured 51.6 GiB
per GPU for ZeRO-2 with gradient checkpointing at 4 ranks (4 x H200). Halving the ranks doubles
the sharded part (fp32 master + Adam, gradient partition, and the fp32 gradient copy DeepSpeed
makes of the largest group at the step: ~16-18 bytes per trainable parameter), ~+30 GiB, so
2 ranks need ~80-85 GiB: an H200 holds it, an 80 GB H100 likely not; there, run `--zero-stage 3`.
Gradient checkpointing is on by default at full size (both runs). One GPU cannot hold ZeRO state
for 7.7B trainable parameters (~140 GiB).

The job spec's fit check runs with `cluster.resources.gpu_memory_gib` set to the card's memory
(torch's total_memory of GPU 0) and `data.max_pixels` set to the frames' real size (391 tokens
per image), so it judges this job honestly instead of the 80 GiB default and the pixel budget's
upper bound.

`--tiny` runs the same stages, the same commands, on CPU (gloo) with the demo's tiny-flavor
checkpoints, fp32: they describe their own architecture, so precompute and the trainer load them
as they load VGGT-1B and Qwen2.5-VL-7B.

    python3 bench/train_full.py --gpus 2                  # device: 2 x H200, < 6 minutes
    python3 bench/train_full.py --gpus 2 --zero-stage 3   # device: 2 x H100
    python3 bench/train_full.py --tiny          # CPU, ~1-2 minutes (tests/test_bench_train_full.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, print_table, results_path, write_json_atomic  # noqa: E402

from janus_job.monitor.trackers import STATUS_FILE  # noqa: E402

SEED = 0
FRAME_SIZE = (640, 480)  # JanusVLN's camera: 644 px VGGT width, 46x34 patches, 391 tokens per image
EPISODES = 2
STEPS_PER_EPISODE = 12  # history rule: samples with 1..9 frames
TINY_STEPS_PER_EPISODE = 5
MAX_PIXELS = 400 * 28 * 28  # >= 644x476, so Qwen's processor keeps the frame (391 tokens per image)
LOSS_BOUND = {"bf16": 1e-2, "fp32": 1e-6}  # bf16 on GPU; the CPU bound of its CI check
MODES = ("precomputed", "online")
LOG_LINE = re.compile(r"^train step=\S+ .*mfu=\S+")
# A plausible MFU for the last logged step on a GPU (model FLOPs, docs/training.md): well above a
# broken FLOP count or an idle GPU, below what dense bf16 training reaches.
MFU_PLAUSIBLE = (0.02, 0.75)

# Per-stage limits (seconds) at full size; --tiny uses TINY_LIMIT_S for every stage. Every stage
# also ends by --budget-s (the whole run), leaving RESERVE_S to write the JSON and clean up.
LIMIT_S = {"checkpoints": 200, "precompute": 150, "train-precomputed": 240, "train-online": 240}
TINY_LIMIT_S = 150
RESERVE_S = 20


class StageFailed(RuntimeError):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"stage {stage} failed: {message}")
        self.stage = stage


# ---------------------------------------------------------------- child entries


def make_checkpoints(workdir: Path, tiny: bool, text_layers: int | None = None) -> dict:
    """Random-weight Qwen2.5-VL + VGGT aggregator checkpoints in `workdir/models`; returns facts.
    `text_layers`: Qwen2.5-VL-7B's widths with that many decoder layers (default: its 28)."""
    import torch

    started = time.perf_counter()
    models = workdir / "models"
    if tiny:
        from janus_job.demo.run import write_tiny_models

        qwen_dir, vggt_path = write_tiny_models(models)
        return {"qwen": str(qwen_dir), "vggt": str(vggt_path), "card": "cpu", "gpu_memory_gib": None,
                "qwen_params": None, "vggt_params": None, "save_s": time.perf_counter() - started}

    from transformers import Qwen2_5_VLForConditionalGeneration

    from janus_job.demo.tiny import QWEN_SPECIAL_TOKENS, tiny_image_processor, tiny_tokenizer
    from janus_job.models.flavors import qwen25_vl_7b_config
    from janus_job.models.janusvln.build import _default_dtype
    from janus_job.models.vggt import FrameCausalAggregator, VGGTAggregatorConfig, save_aggregator

    if not torch.cuda.is_available():
        raise SystemExit("checkpoints: full size builds the 7B model on the GPU and none is visible (use --tiny)")
    device = torch.device("cuda", 0)
    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = qwen25_vl_7b_config(text_layers)  # Qwen's vocabulary size; special tokens at the offline tokenizer's ids
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    config.text_config.bos_token_id = config.text_config.pad_token_id = ids["<|endoftext|>"]
    config.text_config.eos_token_id = ids["<|im_end|>"]

    qwen_dir = models / "qwen25-vl-7b-random"
    torch.manual_seed(SEED)
    with _default_dtype(torch.bfloat16), device:
        qwen = Qwen2_5_VLForConditionalGeneration(config)
    qwen_params = sum(p.numel() for p in qwen.parameters())
    qwen.save_pretrained(qwen_dir)
    del qwen
    tokenizer.save_pretrained(qwen_dir)
    tiny_image_processor(max_pixels=MAX_PIXELS).save_pretrained(qwen_dir)

    torch.manual_seed(SEED + 1)
    with device:
        aggregator = FrameCausalAggregator(VGGTAggregatorConfig())  # fp32, as VGGT-1B ships
    vggt_params = sum(p.numel() for p in aggregator.parameters())
    vggt_path = models / "vggt-1b-random" / "model.safetensors"
    vggt_path.parent.mkdir(parents=True, exist_ok=True)
    save_aggregator(aggregator, vggt_path)
    return {
        "qwen": str(qwen_dir),
        "vggt": str(vggt_path),
        "card": torch.cuda.get_device_name(device),
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 1024**3,
        "qwen_params": qwen_params,
        "qwen_text_layers": config.text_config.num_hidden_layers,
        "vggt_params": vggt_params,
        "save_s": time.perf_counter() - started,
    }


# ---------------------------------------------------------------- stages


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc; torchrun puts ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    for target in [pid] + _descendants(pid):
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_stage(stage: str, command: list[str], env: dict, limit_s: float, log_dir: Path) -> tuple[list[str], float]:
    """Runs one stage's process, echoing its output; returns (output lines, wall seconds).

    Raises StageFailed on a non-zero exit or when it runs past `limit_s` (its whole process tree
    is killed first, so no rank is left holding a GPU).
    """
    print(f"[{stage}] $ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    lines: list[str] = []
    log_path = log_dir / f"{stage}.log"
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO_ROOT, start_new_session=True, bufsize=1)

    def pump() -> None:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                log.write(line)
                print(f"[{stage}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        proc.wait()
        reader.join(timeout=5)
        raise StageFailed(stage, f"no result within {limit_s:.0f}s (killed; log {log_path})") from None
    reader.join(timeout=30)
    wall = time.perf_counter() - started
    if rc != 0:
        tail = "\n".join(lines[-40:])
        raise StageFailed(stage, f"exit status {rc} after {wall:.0f}s (log {log_path}):\n{tail}")
    return lines, wall


def child_env(workdir: Path) -> dict:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:
        paths.append(str(REPO_ROOT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"
    env["JANUS_MODEL_CACHE"] = str(workdir / "model-cache")
    return env


def make_dataset(root: Path, tiny: bool) -> Path:
    """janus_job.demo.run's synthesiser at JanusVLN's frame size."""
    from janus_job.demo import run as demo

    return demo.synthesize_dataset(root, episodes=EPISODES, frame_size=FRAME_SIZE,
                                   steps=TINY_STEPS_PER_EPISODE if tiny else STEPS_PER_EPISODE)


def job_spec(workdir: Path, annotations: Path, models: dict, args: argparse.Namespace, mode: str) -> dict:
    """The demo's spec (janus_job.demo.run.demo_spec), sized for this check; only features.mode varies."""
    from janus_job.data.frames import VGGT_TARGET_WIDTH
    from janus_job.demo.run import demo_spec

    gpu = not args.tiny
    spec = demo_spec(workdir, annotations, Path(models["qwen"]), Path(models["vggt"]), steps=args.steps, gpu=gpu,
                     micro_batch_size=1, global_batch_size=args.global_batch)
    spec["name"] = "train-full"
    spec["data"].update(frame_width=VGGT_TARGET_WIDTH, min_pixels=16 * 28 * 28, max_pixels=MAX_PIXELS,
                        num_workers=0 if args.tiny else 2,
                        pin_memory=gpu, persistent_workers=False)
    # the spec refuses cache_vision in online mode (nothing is read from the store)
    spec["features"].update(mode=mode, cache_vision=mode != "online")
    spec["training"].update(gpus_per_node=args.gpus, learning_rate=2e-5, merger_learning_rate=1e-5,
                            warmup_ratio=0.0, gradient_checkpointing=args.gradient_checkpointing, seed=42,
                            export=False)  # an export saves the last step; every run starts from the same weights
    spec["deepspeed"] = {"zero_stage": args.zero_stage, "optimizer": "torch", "bf16": gpu}
    # The fit check judges the full-size model: give it this card's memory. Tiny models fit anywhere.
    spec["cluster"]["resources"]["gpu_memory_gib"] = 100_000 if args.tiny else round(models["gpu_memory_gib"], 2)
    return spec


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_spec(path: Path, spec: dict) -> None:
    import yaml

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(spec, sort_keys=False))
    os.replace(tmp, path)


def fit_estimates(spec_paths: dict[str, Path]) -> dict:
    """The spec's own memory estimate per mode (validating the specs: a refusal fails here)."""
    from janus_job.config.load import load_spec
    from janus_job.config.memory import estimate_gpu_memory
    from janus_job.errors import JobError

    out = {}
    for mode, path in spec_paths.items():
        try:
            spec = load_spec(path)
        except JobError as err:
            raise StageFailed("spec", f"{mode} spec refused: {err}") from None
        est = estimate_gpu_memory(spec)
        out[mode] = {"estimate_gib": round(est.total, 2), "parts": est.describe()}
    return out


def precompute_store(spec_path: Path, env: dict, limit_s: float, log_dir: Path) -> float:
    """`janus-job precompute` of the spec's whole dataset in one worker (the `precompute` stage); its wall time."""
    command = [sys.executable, "-m", "janus_job.cli", "precompute", "--spec", str(spec_path), "--index", "0",
               "--progress-interval", "10"]
    return run_stage("precompute", command, env, limit_s, log_dir)[1]


def train_run(stage: str, spec_path: Path, gpus: int, env: dict, limit_s: float,
              workdir: Path) -> tuple[list, float, list]:
    """One `torchrun -m janus_job.cli train` on the spec (stage `stage`, log in workdir/logs); returns its lines,
    its wall time and the trainer's `train` metrics records of every rank, by step. No record fails the stage."""
    metrics = str(workdir / f"metrics-{stage}-rank{{rank}}.jsonl")
    run_env = {**env, "JANUS_METRICS_FILE": metrics, "JANUS_PRECOMPUTE_WAIT_S": "60"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
               "-m", "janus_job.cli", "train", "--spec", str(spec_path)]
    lines, wall = run_stage(stage, command, run_env, limit_s, workdir / "logs")
    records = sorted((r for r in read_metrics(metrics, gpus) if r.get("event") == "train"), key=lambda r: r["step"])
    if not records:
        raise StageFailed(stage, "the trainer wrote no `train` metrics record")
    return lines, wall, records


def record_failure(report: dict, stage: str, err: Exception) -> None:
    """A stage's failure into the report and one line on stderr (the bench still writes its JSON)."""
    if isinstance(err, StageFailed):
        report.update(status="failed", failed_stage=err.stage, error=str(err))
        print(f"error: {err}", file=sys.stderr, flush=True)
    else:
        report.update(status="failed", failed_stage=stage, error=f"{type(err).__name__}: {err}")
        print(f"error: stage {stage} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


def finish_report(path: Path, report: dict, workdir: Path, args: argparse.Namespace) -> None:
    """Writes the report to `path`, copies the stages' logs beside it (`<stem>-logs/`) and removes the work
    directory unless it was given (--workdir) or is to be kept (--keep-workdir)."""
    write_json_atomic(path, report)
    shutil.copytree(workdir / "logs", path.with_name(path.stem + "-logs"), dirs_exist_ok=True)
    print(f"wrote {path} and the stages' logs in {path.stem}-logs/", flush=True)
    if not (args.keep_workdir or args.workdir):  # a temp dir of ours (~20 GB at full size)
        shutil.rmtree(workdir, ignore_errors=True)


def read_metrics(path_template: str, gpus: int) -> list[dict]:
    records = []
    for rank in range(gpus):
        path = Path(path_template.replace("{rank}", str(rank)))
        if path.exists():
            records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def summarise_run(mode: str, lines: list[str], wall: float, records: list[dict]) -> dict:
    steps = [r for r in records if r.get("event") == "train"]
    done = [r for r in records if r.get("event") == "done"]
    by_step = {r["step"]: r for r in steps if r.get("rank") == 0}
    first = by_step.get(1)
    return {
        "mode": mode,
        "wall_s": wall,
        "start_line": next((l for l in lines if l.startswith("train start ")), None),
        "log_lines": [l for l in lines if LOG_LINE.match(l)],
        "done_lines": [l for l in lines if l.startswith("train done ")],
        "records": steps,
        "param_norms": {r["rank"]: r["param_norm"] for r in done},
        "step1_loss": None if first is None else first["loss"],
        "mfu": {s: r["mfu"] for s, r in sorted(by_step.items())},
        "s_per_it": {s: r["s_per_it"] for s, r in sorted(by_step.items())},
        "mem_peak_gib_max": max((r["mem_max_gib"] for r in steps if r.get("mem_max_gib") is not None), default=None),
    }


# ---------------------------------------------------------------- the orchestrator


def _versions() -> dict:
    from importlib import metadata

    found = {}
    for package in ("torch", "transformers", "deepspeed", "pydantic"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def new_workdir(given: str | None, prefix: str) -> Path:
    """--workdir (new or empty) or a fresh temporary folder, with its logs/ folder."""
    workdir = Path(given) if given else Path(tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise SystemExit(f"--workdir {workdir} is not empty; give a new or empty directory")
    (workdir / "logs").mkdir()
    return workdir


def stage_limits(budget_s: float, own: Callable[[str], float]) -> Callable[[str], float]:
    """A stage's time limit: its own, cut to what --budget-s leaves (RESERVE_S kept for the JSON)."""
    deadline = time.monotonic() + budget_s

    def limit(stage: str) -> float:
        left = deadline - RESERVE_S - time.monotonic()
        if left < 10:
            raise StageFailed(stage, f"--budget-s {budget_s:.0f} is spent before it could start")
        return min(own(stage), left)

    return limit


def orchestrate(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    workdir = new_workdir(args.workdir, "train-full-")
    env = child_env(workdir)
    limit = stage_limits(args.budget_s, lambda stage: TINY_LIMIT_S if args.tiny else LIMIT_S[stage] * args.limit_scale)

    me = str(Path(__file__).resolve())
    report: dict[str, Any] = {
        "bench": "train_full",
        "tiny": args.tiny,
        "command": "python3 bench/train_full.py " + " ".join(argv),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpus": args.gpus,
        "card": "cpu" if args.tiny else None,
        "dtype": "fp32" if args.tiny else "bf16",
        "gradient_checkpointing": args.gradient_checkpointing,
        "zero_stage": args.zero_stage,
        "versions": _versions(),
        "status": "running",
        "stages_s": {},
    }
    stage = "dataset"
    try:
        t0 = time.perf_counter()
        annotations = make_dataset(workdir / "data", args.tiny)
        report["stages_s"]["dataset"] = time.perf_counter() - t0
        report["samples"] = len(json.loads(annotations.read_text()))

        stage = "checkpoints"
        info_path = workdir / "checkpoints.json"
        command = [sys.executable, me, "_checkpoints", "--workdir", str(workdir), "--info", str(info_path)]
        _, report["stages_s"]["checkpoints"] = run_stage("checkpoints", command + (["--tiny"] if args.tiny else []),
                                                         env, limit("checkpoints"), workdir / "logs")
        models = json.loads(info_path.read_text())
        report["checkpoints"] = models
        report["card"] = models["card"]

        stage = "spec"
        specs = {mode: job_spec(workdir, annotations, models, args, mode) for mode in MODES}
        differing = sorted(k for k, v in _flatten(specs["precomputed"]).items()
                           if _flatten(specs["online"]).get(k) != v)
        report["spec"] = specs["precomputed"]
        report["specs_differ_in"] = differing
        spec_paths = {mode: workdir / f"job-{mode}.yaml" for mode in MODES}
        for mode in MODES:
            write_spec(spec_paths[mode], specs[mode])
        report["fit_check"] = {"gpu_memory_gib": specs["online"]["cluster"]["resources"]["gpu_memory_gib"],
                               **fit_estimates(spec_paths)}

        stage = "precompute"
        report["stages_s"]["precompute"] = precompute_store(spec_paths["precomputed"], env, limit("precompute"),
                                                            workdir / "logs")

        report["runs"] = {}
        for mode in MODES:
            stage = f"train-{mode}"
            metrics = str(workdir / f"metrics-{mode}-rank{{rank}}.jsonl")
            run_env = {**env, "JANUS_METRICS_FILE": metrics, "JANUS_PRECOMPUTE_WAIT_S": "60"}
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", str(args.gpus)]
            command += ["-m", "janus_job.cli", "train", "--spec", str(spec_paths[mode])]
            lines, wall = run_stage(stage, command, run_env, limit(stage), workdir / "logs")
            report["stages_s"][stage] = wall
            run = summarise_run(mode, lines, wall, read_metrics(metrics, args.gpus))
            report["runs"][mode] = run
            if not run["log_lines"] or run["step1_loss"] is None:
                raise StageFailed(stage, "the trainer printed no `train step=` line / metrics record for step 1")
            saved = [path for path in (workdir / "checkpoints").glob("*") if path.name != STATUS_FILE]
            if saved:  # the next run would resume from it instead of starting from the same weights
                raise StageFailed(stage, f"the run wrote checkpoints ({saved[:2]}); training.checkpoint.interval_steps")
    except Exception as err:  # a failed stage (or anything else) still ends in a JSON naming the stage
        record_failure(report, stage, err)
    report["wall_s"] = time.perf_counter() - started

    if report["status"] != "failed":
        cached, online = (report["runs"][m]["step1_loss"] for m in MODES)
        rel = abs(cached - online) / max(abs(online), 1e-12)
        bound = LOSS_BOUND[report["dtype"]]
        report["comparison"] = {"step": 1, "loss_precomputed": cached, "loss_online": online,
                                "rel_error": rel, "bound": bound, "passed": rel <= bound}
        last_mfu = {m: list(r["mfu"].values())[-1] for m, r in report["runs"].items()}
        mfu_ok = args.tiny or all(v is not None and MFU_PLAUSIBLE[0] <= v <= MFU_PLAUSIBLE[1]
                                  for v in last_mfu.values())
        report["mfu_check"] = {"last_step_mfu": last_mfu, "plausible_range": MFU_PLAUSIBLE,
                               "passed": mfu_ok, "applies": not args.tiny}
        report["status"] = "loss_mismatch" if rel > bound else ("passed" if mfu_ok else "mfu_implausible")
        rows = [{"mode": m, "loss1": r["step1_loss"], "mfu_last": list(r["mfu"].values())[-1],
                 "s_it_last": list(r["s_per_it"].values())[-1], "mem_max": r["mem_peak_gib_max"],
                 "fit": report["fit_check"][m]["estimate_gib"], "wall_s": r["wall_s"]}
                for m, r in report["runs"].items()]
        print_table(
            rows,
            [
                ("mode", "features"),
                ("loss1", "loss step 1"),
                ("mfu_last", "mfu (last step)"),
                ("s_it_last", "s/it (last)"),
                ("mem_max", "mem max GiB"),
                ("fit", "fit-check estimate GiB"),
                ("wall_s", "trainer wall s"),
            ],
            title=f"train_full on {args.gpus} x {report['card']} ({report['dtype']}, ZeRO-{args.zero_stage}, grad ckpt "
            f"{'on' if args.gradient_checkpointing else 'off'})",
        )
        if not args.tiny:
            print(f"last-step MFU {last_mfu} within {MFU_PLAUSIBLE}: {'PASS' if mfu_ok else 'FAIL'}", flush=True)
        print(
            f"step-1 loss rel. error {rel:.2e} (bound {bound:g}): {'PASS' if rel <= bound else 'FAIL'}; "
            f"total {report['wall_s']:.0f}s",
            flush=True,
        )
        for mode, run in report["runs"].items():
            for line in run["log_lines"]:
                print(f"  {mode}: {line}")

    path = results_path(
        report["card"] or "unknown", args.gpus, args.out, prefix="train_full-", tag="tiny" if args.tiny else ""
    )
    finish_report(path, report, workdir, args)
    return {"passed": 0, "loss_mismatch": 1, "mfu_implausible": 1}.get(report["status"], 2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_checkpoints":
        child = argparse.ArgumentParser(prog=f"train_full.py {argv[0]}")
        child.add_argument("--workdir")
        child.add_argument("--info")
        child.add_argument("--tiny", action="store_true")
        child.add_argument("--text-layers", type=int)
        opts = child.parse_args(argv[1:])
        write_json_atomic(opts.info, make_checkpoints(Path(opts.workdir), opts.tiny, opts.text_layers))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2, help="ranks (GPUs, or CPU processes with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (CI)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="samples per optimizer step (default 2 x gpus: micro 1, accumulation 2)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="training.gradient_checkpointing of both runs (default: on at full size, so "
        "2 x 80 GB hold ZeRO-2 state + online encoders; off with --tiny)",
    )
    parser.add_argument(
        "--zero-stage",
        type=int,
        default=2,
        choices=(1, 2, 3),
        help="deepspeed.zero_stage of both runs (2: the product default; 2 ranks of ZeRO-2 "
        "are projected to need ~80-85 GiB per GPU: H200, or 3 on H100)",
    )
    parser.add_argument("--limit-scale", type=float, default=1.0, help="multiply the per-stage time limits")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=560.0,
        help="wall-clock limit of the whole run; stages are cut to fit it (default 560: "
        "under the device's 10-minute command limit, with the JSON still written)",
    )
    parser.add_argument(
        "--workdir", help="empty directory for models, data, store (kept; default: a new temp dir, removed at the end)"
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp work directory (~20 GB full size)")
    parser.add_argument("--out", help="result folder (default $OUT, else bench/results)")
    args = parser.parse_args(argv)
    if args.global_batch is None:
        args.global_batch = 2 * args.gpus
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = not args.tiny
    return orchestrate(args, argv)


if __name__ == "__main__":
    sys.exit(main())

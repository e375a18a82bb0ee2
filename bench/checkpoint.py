"""Checkpoint save and resume of the full-size model under the default configuration, measured.

    python3 bench/checkpoint.py --gpus 4 --url /tmp/janus-ckpt-bench
    python3 bench/checkpoint.py --tiny            # CPU, gloo, 2 processes, tiny model (CI)

Starts one `torchrun` process group. Every rank builds JanusVLN at Qwen2.5-VL-7B shape (random
weights, bf16, directly on its GPU; the frozen vision blocks are not checkpointed) and the
DeepSpeed engine from the config `janus_job.config.deepspeed` renders for the spec defaults (ZeRO-2,
bf16, AdamW). One optimizer step on a cheap surrogate loss (every trainable parameter gets a
gradient, no forward pass) fills the Adam moments, then:

- save: `CheckpointManager.save` (local shard write; upload + COMPLETE in the background). Timed
  per rank: time training is held (`blocking_s`), local write, upload, until COMPLETE on rank 0.
  Host memory: a 10 ms sampler records every rank's RSS during the save and upload; the peak
  increase over the RSS just before the save is reported per rank and summed per node.
- resume: `CheckpointManager.load` of that checkpoint into the same engine at the same world
  size (the path after a pod loss), timed; the local fp32 partition and Adam moments are compared
  with those before saving (checksums).
- with `--universal`: the resize path: conversion to the universal layout + resharded load
  (forced at the same size; skipped unless 2.2x the checkpoint is free on the staging disk).

Prints a table and writes JSON to `$OUT` or `bench/results/checkpoint-<date>-<card>-<gpus>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import common  # noqa: E402  (bench/common.py)

GIB = 1024**3


class RssSampler:
    """Peak resident memory of this process while running (10 ms polling)."""

    def __init__(self, interval_s: float = 0.01):
        import psutil

        self.process = psutil.Process()
        self.interval_s = interval_s
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def bench_spec(world_size: int, tiny: bool, url: str):
    """The spec defaults at `world_size` (as bench/step.py builds them), checkpointing to `url`."""
    return common.default_job_spec("bench-checkpoint", world_size, tiny=tiny, checkpoint_url=url)


def _partition_checksums(engine) -> list[float]:
    """fp32 master partition and Adam moments of this rank, as float64 sums."""
    import torch

    opt = engine.optimizer
    sums = []
    for flat in opt.single_partition_of_fp32_groups:
        sums.append(flat.double().sum().item())
        state = opt.optimizer.state.get(flat, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                sums.append(state[key].double().sum().item())
    return sums if sums else [float(torch.nan)]


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from janus_job.config.deepspeed import render_deepspeed_config
    from janus_job.models.flavors import qwen25_vl_7b_config
    from janus_job.models.janusvln.build import model_from_config
    from janus_job.train.checkpoint import CheckpointManager
    from janus_job.train.distributed import skip_cpu_shm_collectives
    from janus_job.train.engine import build_engine
    from janus_job.train.shutdown import release_distributed

    cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        skip_cpu_shm_collectives()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    spec = bench_spec(world, args.tiny, args.url)
    config = render_deepspeed_config(spec, world)
    if args.tiny or args.optimizer == "torch":
        config.pop("optimizer", None)  # torch AdamW: no DeepSpeed op to compile (CPU Adam / FusedAdam)
    if args.tiny:
        from janus_job.demo.tiny import tiny_qwen_config

        qwen = tiny_qwen_config()
        config["bf16"] = {"enabled": False}
    else:
        qwen = qwen25_vl_7b_config()
    dtype = torch.bfloat16 if config["bf16"]["enabled"] else torch.float32
    t0 = time.perf_counter()
    model = model_from_config(qwen, dtype=dtype, device=device)
    # the trainer's engine: its param groups, optimizer and schedule on this DeepSpeed config
    engine, config = build_engine(spec, model, world, total_steps=1, config=config)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    build_s = time.perf_counter() - t0

    # one optimizer step: a surrogate loss that touches every trainable parameter (no activations)
    for _ in range(engine.gradient_accumulation_steps()):
        loss = sum((p.float() * 1e-6).sum() for p in trainable)
        engine.backward(loss)
        engine.step()
    if cuda:
        torch.cuda.synchronize()
    before = _partition_checksums(engine)

    staging = Path(args.staging) / f"node-{os.environ.get('GROUP_RANK', '0')}"
    manager = CheckpointManager(args.url, keep=1, interval_steps=1, rank=rank, world_size=world,
                                local_rank=local_rank, staging_dir=staging)
    dist.barrier()
    with RssSampler() as rss:
        t_save = time.perf_counter()
        manager.save(engine, 1, {"step": 1, "note": "bench"})
        blocking = time.perf_counter() - t_save
        dist.barrier()  # what the slowest rank costs everybody at the next collective
        held = time.perf_counter() - t_save
        manager.wait()
        dist.barrier()
        until_complete = time.perf_counter() - t_save
    save = dict(manager.last_save_stats)
    save.update(held_all_ranks_s=held, until_complete_s=until_complete, blocking_s=blocking,
                rss_before_gib=rss.baseline / GIB, rss_peak_increase_gib=(rss.peak - rss.baseline) / GIB)

    ref = manager.latest()
    assert ref is not None and ref.step == 1, "the checkpoint did not complete"
    # resume into a state that differs: zero the local fp32 partition first
    for flat in engine.optimizer.single_partition_of_fp32_groups:
        flat.data.zero_()
    dist.barrier()
    t_load = time.perf_counter()
    manager.load(engine, ref)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t_load
    after = _partition_checksums(engine)
    resume = dict(manager.last_load_stats, wall_s=load_s, state_equal=before == after)

    universal = None
    if args.universal:
        free = shutil.disk_usage(staging.parent if staging.parent.exists() else "/").free
        # ds_to_universal writes per-parameter fragments, then the merged files: ~2x the checkpoint
        if free < 2.2 * ref.manifest["total_bytes"]:
            universal = {"skipped": f"{free / GIB:.0f} GiB free < 2.2 x checkpoint"}
        else:
            dist.barrier()
            t_u = time.perf_counter()
            manager.load(engine, ref, reshard=True)
            universal = dict(manager.last_load_stats, wall_s=time.perf_counter() - t_u,
                             state_equal=_partition_checksums(engine) == before)

    row = {"rank": rank, "save": save, "resume": resume, "universal": universal}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        result = {
            "card": common.card_name() if cuda else "cpu",
            "gpus": world,
            "tiny": args.tiny,
            "zero_stage": config["zero_optimization"]["stage"],
            "bf16": config["bf16"]["enabled"],
            "optimizer": "deepspeed " + config["optimizer"]["type"] if "optimizer" in config else "torch AdamW",
            "trainable_params": sum(p.numel() for p in trainable),
            "checkpoint_bytes": ref.manifest["total_bytes"],
            "build_s": build_s,
            "url": args.url,
            "ranks": rows,
        }
        Path(args.result).write_text(json.dumps(result, indent=2, default=str))
    release_distributed(engine)


def summarize(result: dict) -> list[dict]:
    ranks = result["ranks"]
    rss = [r["save"]["rss_peak_increase_gib"] for r in ranks]
    out = [{
        "gpus": result["gpus"],
        "ckpt_gib": result["checkpoint_bytes"] / GIB,
        "save_held_s": max(r["save"]["held_all_ranks_s"] for r in ranks),
        "local_write_s": max(r["save"]["local_write_s"] for r in ranks),
        "upload_s": max(r["save"].get("upload_s", 0.0) for r in ranks),
        "complete_s": max(r["save"]["until_complete_s"] for r in ranks),
        "rss_peak_gib": max(rss),
        "rss_node_gib": sum(rss),
        "resume_s": max(r["resume"]["wall_s"] for r in ranks),
        "state_equal": all(r["resume"]["state_equal"] for r in ranks),
        "universal_s": (max(r["universal"]["wall_s"] for r in ranks)
                        if ranks[0]["universal"] and "wall_s" in ranks[0]["universal"] else None),
    }]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=None, help="processes (default: all GPUs; 2 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="CPU, gloo, tiny model (CI)")
    p.add_argument("--url", default=None, help="checkpoint URL (default: a fresh temporary directory)")
    p.add_argument("--staging", default=None, help="node-local staging (default: a temporary directory)")
    p.add_argument("--universal", action="store_true", help="also time the resize (universal) load")
    p.add_argument("--optimizer", choices=("spec", "torch"), default="spec",
                   help="spec: the rendered config's DeepSpeed AdamW (default); torch: torch AdamW (fused)")
    p.add_argument("--out", default=None, help="result folder (default $OUT or bench/results)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    gpus = args.gpus or (2 if args.tiny or not torch.cuda.is_available() else torch.cuda.device_count())
    with tempfile.TemporaryDirectory(prefix="janus-ckpt-bench-") as tmp:
        url = args.url or str(Path(tmp) / "store")
        staging = args.staging or str(Path(tmp) / "staging")
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               str(Path(__file__).resolve()), "--worker", "--url", url, "--staging", staging,
               "--result", str(result_file)]
        if args.tiny:
            cmd.append("--tiny")
        if args.universal:
            cmd.append("--universal")
        cmd += ["--optimizer", args.optimizer]
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        if args.tiny:
            env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT)
        if proc.returncode != 0 or not result_file.exists():
            print(f"bench/checkpoint.py: the torchrun group failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        result = json.loads(result_file.read_text())
        if args.url is None:
            shutil.rmtree(url, ignore_errors=True)
    rows = summarize(result)
    result["summary"] = rows[0]
    common.print_table(rows, [
        ("gpus", "GPUs"), ("ckpt_gib", "ckpt GiB"), ("save_held_s", "held s"), ("local_write_s", "write s"),
        ("upload_s", "upload s"), ("complete_s", "COMPLETE s"), ("rss_peak_gib", "RSS+ GiB/rank"),
        ("rss_node_gib", "RSS+ GiB/node"), ("resume_s", "resume s"), ("state_equal", "state equal"),
        ("universal_s", "universal s"),
    ], title=f"checkpoint save/resume - {result['card']} x{result['gpus']} "
             f"(ZeRO-{result['zero_stage']}, {result['optimizer']}, {result['trainable_params'] / 1e9:.2f}B trainable)")
    path = common.results_path(result["card"], result["gpus"], args.out, prefix="checkpoint-")
    common.write_json_atomic(path, result)
    print(f"wrote {path}")
    return 0 if rows[0]["state_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())

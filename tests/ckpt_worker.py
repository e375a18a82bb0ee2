"""A small DeepSpeed training run under torchrun, driven by the checkpoint tests.

Tiny MLP (a frozen input layer, dropout), real DeepSpeed ZeRO (gloo, CPU), torch AdamW, a
warmup+decay LR schedule, janus_job.data.sampler.BalancedBatchSampler and janus_job.train.checkpoint. Rank 0
appends one JSON line per optimizer step to --step-log: the attempt (torchrun restart count), step, the
sample ids every rank actually trained (gathered), the global mean loss and the lr.

Fault injection: --die-at-step S (rank --die-rank SIGKILLs itself in the middle of step S, first
attempt only), --die-during-save S (rank --die-rank SIGKILLs itself after uploading its first file
of step S's checkpoint, in attempt --die-attempt).
State dumps for the resize tests: full fp32 master weights and Adam moments gathered to rank 0
(--dump-at-save, --dump-after-load); --reference-state starts from such a dump instead of a
checkpoint (the "uninterrupted run at the new size from the same state").
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_SAMPLES = 96
FEATURES = 12
CLASSES = 4


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--staging", required=True)
    p.add_argument("--step-log", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--sync-upload", action="store_true")
    p.add_argument("--stop-after", type=int, default=None, help="exit cleanly after this step (a scale event)")
    p.add_argument("--die-at-step", type=int, default=None)
    p.add_argument("--die-during-save", type=int, default=None)
    p.add_argument("--die-rank", type=int, default=1)
    p.add_argument("--die-attempt", type=int, default=0)
    p.add_argument("--dump-at-save", default=None)
    p.add_argument("--dump-after-load", default=None)
    p.add_argument("--reference-state", default=None)
    return p.parse_args()


def dataset():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(NUM_SAMPLES, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (NUM_SAMPLES,), generator=g)
    lengths = np.random.default_rng(7).integers(1, 10, NUM_SAMPLES) * 100
    ids = [f"s{i:03d}" for i in range(NUM_SAMPLES)]
    return x, y, lengths, ids


def model(dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 16),  # frozen, like the frozen encoders of the real model
        torch.nn.GELU(),
        torch.nn.Linear(16, 32),
        torch.nn.GELU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(32, CLASSES),
    )
    net[0].requires_grad_(False)
    return net


def gather_full_state(engine) -> dict:
    """fp32 master weights, exp_avg, exp_avg_sq of every trainable parameter (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()  # links fragments after a legacy load
    out = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        out[name] = {
            "fp32": safe_get_full_fp32_param(param).detach().clone().cpu(),
            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg").detach().clone().cpu(),
            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq").detach().clone().cpu(),
        }
    steps = {float(s["step"]) for s in opt.optimizer.state.values() if "step" in s}
    return {"params": out, "adam_step": sorted(steps), "lr": engine.get_lr()}


def set_full_state(engine, dump: dict) -> None:
    """Puts a gathered state into a fresh ZeRO-1/2 engine without any checkpoint code."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt = engine.optimizer
    step = dump["adam_step"][0]
    for flat in opt.single_partition_of_fp32_groups:
        opt.optimizer.state[flat] = {
            "step": torch.tensor(step),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    opt._lazy_init_hp_params_optimizer_state()
    for name, param in engine.module.named_parameters():
        if name in dump["params"]:
            entry = dump["params"][name]
            safe_set_full_fp32_param(param, entry["fp32"])
            safe_set_full_optimizer_state(param, entry["exp_avg"], "exp_avg")
            safe_set_full_optimizer_state(param, entry["exp_avg_sq"], "exp_avg_sq")
    opt.update_lp_params()  # the module's weights from the fp32 masters


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, worker_args: list[str], *, max_restarts: int = 0, env: dict | None = None,
             timeout: float = 240):
    """Runs this worker under a real torchrun (c10d rendezvous, as the elastic PyTorchJob does)."""
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "ckpt-test",
        "--max-restarts", str(max_restarts), os.path.abspath(__file__), *worker_args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_log(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def effective_steps(records: list[dict]) -> dict[int, dict]:
    """step -> the record of the attempt whose training of that step survived (the last one)."""
    out = {}
    for record in records:
        if record["event"] == "step":
            out[record["step"]] = record
    return out


def main() -> None:
    import deepspeed
    import torch.distributed as dist

    from janus_job.data.sampler import BalancedBatchSampler
    from janus_job.train.checkpoint import CheckpointManager
    from janus_job.train.distributed import skip_cpu_shm_collectives
    from janus_job.train.shutdown import release_distributed

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    args = parse_args()
    # torch first: after a torchrun restart, deepspeed.init_distributed alone fails to form the gloo
    # mesh of the new attempt (0.19.8); an initialised default group is simply adopted by DeepSpeed
    dist.init_process_group("gloo")
    skip_cpu_shm_collectives()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    x, y, lengths, ids = dataset()
    net = model(args.dropout)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.05, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4) * 0.9 ** s)
    sampler = BalancedBatchSampler(
        lengths, micro_batch_size=args.micro, world_size=world, rank=rank,
        global_batch_size=args.global_batch, seed=5,
    )
    config = {
        "train_batch_size": args.global_batch,
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": sampler.accumulation,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=net, optimizer=optimizer, lr_scheduler=schedule, config=config
    )

    class Manager(CheckpointManager):
        def _after_file_uploaded(self, step, name):
            if (step == args.die_during_save and rank == args.die_rank and attempt == args.die_attempt):
                os.kill(os.getpid(), signal.SIGKILL)

    manager = Manager(
        args.url, args.keep, args.interval, rank=rank, world_size=world,
        staging_dir=args.staging, async_upload=not args.sync_upload,
    )
    step = 0
    resumed_from = None
    if args.reference_state:
        dump = torch.load(args.reference_state, weights_only=False)
        set_full_state(engine, dump)
        step = dump["step"]
        sampler.load_state_dict(dump["sampler"])
        for _ in range(step):
            lr_scheduler.step()  # the schedule position the checkpoint would restore
    else:
        ref = manager.latest()
        if ref is not None:
            state = manager.load(engine, ref)
            sampler.load_state_dict(state["sampler"])
            step = state["step"]
            resumed_from = ref.step
            if args.dump_after_load:
                full = gather_full_state(engine)
                if rank == 0:
                    torch.save({**full, "step": step, "sampler": state["sampler"]}, args.dump_after_load)
    if rank == 0:
        with open(args.step_log, "a") as f:
            f.write(json.dumps({"event": "start", "attempt": attempt, "world": world, "resumed_from": resumed_from,
                                "accumulation": sampler.accumulation}) + "\n")

    while step < args.steps:
        if sampler.epoch_done:
            sampler.set_epoch(sampler.epoch + 1)
        plan = sampler.plan(sampler.epoch, sampler.step_in_epoch)
        trained, loss_sum = [], torch.zeros(1)
        for micro_step, assignment in enumerate(plan):
            index = assignment[rank]
            out = engine(x[index])
            loss = torch.nn.functional.cross_entropy(out, y[index])
            engine.backward(loss)
            if step + 1 == args.die_at_step and rank == args.die_rank and attempt == 0 and micro_step == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            engine.step()
            trained.extend(ids[i] for i in index)
            loss_sum += loss.detach().float()
        sampler.advance()
        step += 1
        dist.all_reduce(loss_sum)
        gathered = [None] * world
        dist.all_gather_object(gathered, trained)
        if rank == 0:
            record = {"event": "step", "attempt": attempt, "step": step, "ids": gathered,
                      "loss": loss_sum.item() / (world * sampler.accumulation), "lr": engine.get_lr()[0]}
            with open(args.step_log, "a") as f:
                f.write(json.dumps(record) + "\n")
        if manager.should_save(step):
            if args.dump_at_save:
                full = gather_full_state(engine)
                if rank == 0:
                    torch.save({**full, "step": step, "sampler": sampler.state_dict()}, args.dump_at_save)
            manager.save(engine, step, {"sampler": sampler.state_dict(), "step": step,
                                        "global_batch_size": args.global_batch})
        if args.stop_after is not None and step >= args.stop_after:
            break
    manager.wait()
    release_distributed(engine)  # the product's end of run: every group and its threads released


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------- the real trainer (janus_job.train.trainer)

def trainer_job(root, *, steps: int, interval: int, keep: int = 3):
    """The demo's tiny job (synthetic data, tiny models, precomputed features) on 2 CPU ranks."""
    import yaml

    from janus_job.demo.run import precompute_features, prepare_job

    spec_path = prepare_job(root, steps=steps, gpu=False)
    precompute_features(spec_path)
    spec = yaml.safe_load(spec_path.read_text())
    spec["training"]["gpus_per_node"] = 2
    spec["training"]["checkpoint"].update(interval_steps=interval, keep=keep)
    spec_path.write_text(yaml.safe_dump(spec))
    return spec_path


def trainer_spec(base, target, checkpoint_url):
    import yaml

    spec = yaml.safe_load(open(base))
    spec["training"]["checkpoint"]["url"] = str(checkpoint_url)
    with open(target, "w") as f:
        yaml.safe_dump(spec, f)
    return target


def trainer_command(nproc: int, spec_path, max_restarts: int = 0) -> list[str]:
    """How janus-job launch starts the trainer in an elastic pod (torchrun, c10d rendezvous)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "trainer-test",
            "--max-restarts", str(max_restarts), "--module", "janus_job.cli", "train", "--spec", str(spec_path)]


def trainer_env(trace_template, staging) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONPATH": REPO,
            "JANUS_SAMPLE_TRACE": str(trace_template), "JANUS_CHECKPOINT_STAGING": str(staging)}


def trained_samples(trace_template, ranks) -> dict:
    """(rank, step, micro_step) -> sample ids, the last record of each (what survived restarts)."""
    out = {}
    for rank in ranks:
        with open(str(trace_template).format(rank=rank)) as f:
            for line in f:
                record = json.loads(line)
                out[(record["rank"], record["step"], record["micro_step"])] = record["sample_ids"]
    return out


def logged_steps(stdout: str) -> dict[int, tuple[float, float]]:
    """step -> (loss, lr) from the trainer's log lines (the last line of each step)."""
    import re

    out = {}
    for match in re.finditer(r"^train step=(\d+)/\d+ .* loss=(\S+) lr=(\S+) ", stdout, re.M):
        out[int(match[1])] = (float(match[2]), float(match[3]))
    return out

"""Why JanusVLN's exact setup stalls under ZeRO-3, shown with real DeepSpeed on CPU.

JanusVLN keeps the frozen VGGT inside the model it hands to DeepSpeed, and streams it: the
aggregator is called once per frame. Under ZeRO-3 every parameter of that model is partitioned,
frozen ones included, and each sub-module call all-gathers its parameters in a forward pre-hook
(`PartitionedParameterCoordinator.fetch_sub_module`). Those all-gathers are collectives, so all
ranks must issue the same number of them in the same order. When two ranks hold samples with
different frame counts in the same micro-step, they call the encoder a different number of
times: the collectives stop pairing up and the step hangs (or fails) instead of finishing.

The worker below (this file run under torchrun, 2 processes, gloo) is a minimal model with the
same structure: a frozen `encoder` called once per frame and a trainable `head`. The tests run

- streaming with equal frame counts on both ranks: completes;
- streaming with different frame counts: does NOT complete (a hang -- every rank still, killed by
  the watchdog below -- or a collective error) -- the stall;
- the fixes, with the same different frame counts: the encoder kept outside the DeepSpeed engine
  (janus-train's online path, and what caching features amounts to), or the encoder called once
  per sample over all its frames (batched, an equal count per rank at micro batch 1): complete.

No test here has a wall-clock limit: each rank runs bench/common.Heartbeat, and a run counts as hung
only when no rank's main thread has moved for HANG_STILL_S (times the machine's load factor) after
initialisation. A slow run on a busy machine keeps moving and is left to finish.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402  (bench/common.py)

WIDTH = 64
DONE = "ZERO3-STALL-WORKER-DONE"
HANG_STILL_S = 60.0  # no rank moved for this long (x load factor) after init: hung; a step moves in well under 1 s


# ---------------------------------------------------------------- the worker (under torchrun)


def parse_schedule(text: str) -> list[list[int]]:
    """"3,3;2,5" -> step 0: 3 frames on both ranks; step 1: 2 frames on rank 0, 5 on rank 1."""
    return [[int(c) for c in step.split(",")] for step in text.split(";")]


def _worker(args: argparse.Namespace) -> None:
    import datetime

    import deepspeed
    import torch
    from torch import nn

    from janus_job.train.distributed import skip_cpu_shm_collectives

    rank = int(os.environ["RANK"])
    heartbeat = common.Heartbeat(Path(args.run_dir) / f"heartbeat-rank{rank}.json").start()
    heartbeat("init")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if args.backend == "nccl":  # the same on GPUs: NCCL does not check sizes, so this hangs
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if args.backend == "gloo":
        skip_cpu_shm_collectives()
    deepspeed.init_distributed(dist_backend=args.backend, timeout=datetime.timedelta(seconds=args.gloo_timeout))

    class Toy(nn.Module):
        """Frozen per-frame encoder + trainable head; the encoder is a sub-module (like JanusVLN's
        `self.vggt`) unless `outside` is given, in which case it lives outside the engine."""

        def __init__(self, outside: nn.Module | None) -> None:
            super().__init__()
            if outside is None:
                self.encoder = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH))
                self.encoder.requires_grad_(False)
            self.outside = [outside]  # a list: not registered as a sub-module
            self.head = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, 1))

        def encode(self, frames: torch.Tensor, mode: str) -> torch.Tensor:
            encoder = self.outside[0] if self.outside[0] is not None else self.encoder
            with torch.no_grad():
                if mode == "batched":
                    return encoder(frames)[-1:]
                state = None
                for frame in frames:  # streaming: one encoder call per frame
                    out = encoder(frame[None])
                    state = out if state is None else state + out
                return state

        def forward(self, frames: torch.Tensor, mode: str) -> torch.Tensor:
            return self.head(self.encode(frames, mode)).pow(2).mean()

    outside = None
    if args.fix == "outside":
        outside = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH))
        outside.requires_grad_(False).to(device)
    model = Toy(outside).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": 3,
            # JanusVLN's zero3.json values where they matter here; threshold 0 partitions every
            # parameter (the real VGGT's weights are all far above HF's 10 x hidden "auto" value)
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_prefetch_bucket_size": 0,
            "overlap_comm": True,
            "contiguous_gradients": True,
        },
        "steps_per_print": 1 << 30,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    schedule = parse_schedule(args.schedule)
    mode = "batched" if args.fix == "batched" else "streaming"
    for step, counts in enumerate(schedule):
        heartbeat("step", step)
        count = counts[rank]
        frames = torch.randn(count, WIDTH, device=device)
        loss = engine(frames, mode)
        engine.backward(loss)
        engine.step()
        print(f"rank {rank} step {step} frames {count} loss {loss.item():.4f}", flush=True)
    torch.distributed.barrier()
    heartbeat("done")
    heartbeat.stop()
    print(f"{DONE} rank {rank}", flush=True)


# ---------------------------------------------------------------- the tests


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(schedule: str, fix: str = "none", still_s: float = HANG_STILL_S,
                backend: str = "gloo") -> dict:
    """Runs the worker on 2 ranks; returns completed / hung / returncode / output. Hung: after
    initialisation no rank's main thread moved for `still_s` x the load factor (then killed)."""
    import tempfile
    import threading

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    if backend == "gloo":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", __file__, "--worker",
           "--schedule", schedule, "--fix", fix,
           "--backend", backend]
    with tempfile.TemporaryDirectory(prefix="zero3-stall-") as run_dir:
        cmd += ["--run-dir", run_dir]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        chunks: list[str] = []
        reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)
        reader.start()
        hung = False
        while proc.poll() is None:
            time.sleep(0.5)
            now = time.time()
            beats = [_read_json(Path(run_dir) / f"heartbeat-rank{r}.json") for r in range(2)]
            if all(b and b["phase"] == "step" for b in beats) and \
                    min(common.still_for(b, now) for b in beats) > still_s * common.load_factor():
                hung = True
                common.kill_tree(proc.pid)  # torchrun and both ranks (each rank runs in a session of its own)
                break
        proc.wait()
        reader.join()
    out = "".join(chunks)
    completed = not hung and proc.returncode == 0 and out.count(DONE) == 2
    return {"completed": completed, "hung": hung, "returncode": proc.returncode, "output": out}


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _assert_stalled(result: dict, at_step: int) -> None:
    out = result["output"]
    assert not result["completed"], out[-3000:]
    # gloo checks message sizes and names the cause; NCCL does not and waits instead (the hang
    # seen on the GPUs). Either way: a collective mismatch inside a parameter fetch.
    assert result["hung"] or "collective mismatch" in out, out[-3000:]
    for step in range(at_step):
        assert f"rank 0 step {step}" in out and f"rank 1 step {step}" in out, out[-3000:]
    assert not (f"rank 0 step {at_step}" in out and f"rank 1 step {at_step}" in out), out[-3000:]


@pytest.mark.slow
def test_streaming_with_equal_frame_counts_completes():
    result = run_workers("3,3;3,3")
    assert result["completed"], result["output"][-3000:]


@pytest.mark.slow
def test_frame_count_changing_between_steps_alone_completes():
    """Trace invalidation (the recorded module order no longer matches) is harmless on its own:
    every rank invalidates at the same point and falls back to fetch-on-demand together."""
    result = run_workers("3,3;2,2;5,5")
    assert result["completed"], result["output"][-3000:]


@pytest.mark.slow
def test_streaming_with_unequal_frame_counts_stalls():
    """The hang: rank 0 streams 2 frames, rank 1 streams 5 -> unmatched parameter all-gathers."""
    _assert_stalled(run_workers("2,5"), at_step=0)


@pytest.mark.slow
def test_first_step_matches_by_chance_then_stalls():
    """The issue's pattern: micro-step 0 finishes (equal counts), the next one never does."""
    _assert_stalled(run_workers("3,3;2,5"), at_step=1)


@pytest.mark.slow
@pytest.mark.parametrize("fix", ["outside", "batched"])
def test_fixes_complete_with_unequal_frame_counts(fix):
    result = run_workers("2,5;4,1;3,3", fix=fix)
    assert result["completed"], result["output"][-3000:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--schedule", default="3,3;2,5", help="per step ';', per rank ',': frame counts")
    parser.add_argument("--fix", choices=["none", "outside", "batched"], default="none")
    parser.add_argument("--gloo-timeout", type=int, default=300, help="process-group timeout (s)")
    parser.add_argument("--run-dir", help="where the ranks' heartbeats go (the parent watches them)")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--still-s", type=float, default=HANG_STILL_S,
                        help="kill the run when no rank moved for this long (x load factor)")
    args = parser.parse_args()
    if args.worker:
        _worker(args)
    else:  # by hand: python tests/test_zero3_stall.py --schedule "3,3;2,5" [--backend nccl] (2 GPUs)
        result = run_workers(args.schedule, args.fix, still_s=args.still_s, backend=args.backend)
        print(result["output"][-5000:])
        print({k: v for k, v in result.items() if k != "output"})


if __name__ == "__main__":
    main()

"""A finished rank exits 0: the trainer's own end of run (janus_job.train.shutdown) tears the run down
while the interpreter is whole, so no rank dies at exit with `terminate called without an active
exception` (SIGABRT) after its job is done.

The abort was a race at interpreter exit: process groups kept alive past their destruction by
module-level references left their gloo worker threads running into interpreter finalization,
where a thread that still needed Python was torn down inside C++ (about once in a few hundred
rank exits on a loaded machine). Two checks: the release itself, which leaves no worker thread
(deterministic, per ZeRO stage), and the real 2-rank job run many times, every rank of every run
exiting 0 without finish_rank reporting a surviving group. The count is the point, not the time:
JANUS_CLEAN_EXIT_RUNS (default 30, in three parts that test workers can share) sets it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

RUNS = int(os.environ.get("JANUS_CLEAN_EXIT_RUNS", "30"))
PARTS = 3


@pytest.fixture(scope="module")
def cheap_job(tmp_path_factory) -> Path:
    """The demo's tiny job at its cheapest: one optimizer step of one micro-batch per rank, read from
    a filled store."""
    from janus_job.demo.run import precompute_features, prepare_job

    root = tmp_path_factory.mktemp("clean-exit")
    spec_path = prepare_job(root, steps=1, gpu=False, micro_batch_size=1, global_batch_size=2)
    spec = yaml.safe_load(spec_path.read_text())
    spec["training"]["gpus_per_node"] = 2
    spec["training"]["export"] = False  # every run starts at step 0: no last save for the next run to resume
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    precompute_features(spec_path)
    return spec_path


def _run_job(spec_path: Path) -> subprocess.CompletedProcess:
    from conftest import free_port

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "JANUS_STATS_DIR")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "janus_job.cli", "train", "--spec", str(spec_path)]
    return subprocess.run(command, capture_output=True, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("part", range(PARTS))
def test_the_two_rank_job_never_aborts_at_exit(cheap_job, part):
    failures = []
    runs = range(part, RUNS, PARTS)
    for attempt in runs:
        result = _run_job(cheap_job)
        out = result.stdout + result.stderr
        done = sorted(line.split()[3] for line in out.splitlines() if line.startswith("train done "))
        leaked = "outlive the process groups" in out  # finish_rank's report: a group survived its release
        if result.returncode != 0 or "terminate called" in out or leaked or done != ["rank=0", "rank=1"]:
            failures.append((attempt, result.returncode, out[-3000:]))
    assert not failures, (f"{len(failures)} of {len(runs)} runs did not end with both ranks exiting 0; first:\n"
                          f"{failures[0][2]}")


_RANK_SCRIPT = """
import os, sys, torch, deepspeed, torch.distributed as dist
import deepspeed.utils.groups as groups
from janus_job.train.shutdown import finish_rank, gloo_worker_threads
from janus_job.train.distributed import skip_cpu_shm_collectives

class Owner:
    engine = None

def train(owner, stage, own_optimizer):
    # sub-modules: ZeRO-3 fetches and releases parameters per module (and caches what to release)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}
    if own_optimizer:  # the trainer's way: a torch optimizer handed to DeepSpeed
        config["zero_allow_untested_optimizer"] = True
        owner.engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                                config=config)
    else:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}
        owner.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    for _ in range(3):  # from the second step ZeRO-3 follows its recorded trace
        loss = owner.engine(torch.randn(1, 8)).sum()
        owner.engine.backward(loss)
        owner.engine.step()

skip_cpu_shm_collectives()
deepspeed.init_distributed(dist_backend="gloo")
before = gloo_worker_threads()
owner = Owner()
train(owner, int(sys.argv[1]), sys.argv[2] == "own")
left = finish_rank(owner)
with open(sys.argv[3] + "." + os.environ["RANK"], "w") as f:
    f.write(f"RELEASED {dist.is_initialized()} {owner.engine} {groups._WORLD_GROUP} threads {left}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage,optimizer", [(1, "own"), (2, "own"), (2, "deepspeed"), (3, "own")])
def test_the_end_of_run_releases_the_distributed_state(tmp_path, stage, optimizer):
    """finish_rank on a real 2-rank DeepSpeed engine over gloo: the process group is gone afterwards,
    DeepSpeed's cached clone of the world group is dropped, no gloo worker thread is left (every
    group's destructor ran, with the interpreter alive), and the rank exits 0. Without the release of
    the module-level references (import-time default arguments, ZeRO-3's module stack) the threads
    of at least one group stay: this fails deterministically, not once in a few hundred exits."""
    from conftest import free_port

    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
                             str(stage), optimizer, str(tmp_path / "released")],
                            capture_output=True, text=True, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"released.{rank}").read_text() == "RELEASED False None None threads 0", out[-3000:]
    assert "outlive the process groups" not in out, out[-3000:]

"""`janus-job launch`: the PyTorchJob operator's variables become the right torchrun command."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import JANUS_JOB, free_port

from janus_job.deploy.launch import ALLOCATOR_DEFAULT, ALLOCATOR_ENV, runtime_defaults, torchrun_arguments
from janus_job.errors import JobError


def args_for(env: dict, **overrides) -> list[str]:
    options = dict(job_name="nav", default_nodes=1, default_nproc=8, max_restarts=10)
    options.update(overrides)
    return torchrun_arguments(env, "/etc/janus/job.yaml", **options)


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_static_job_passes_the_node_rank_not_a_process_rank():
    env = {"PET_NNODES": "4", "PET_NODE_RANK": "2", "PET_NPROC_PER_NODE": "8",
           "PET_MASTER_ADDR": "nav-master-0", "PET_MASTER_PORT": "23456",
           # the operator's pod-level values, which a plain `python train.py` would misread:
           "RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "nav-master-0", "MASTER_PORT": "23456"}
    args = args_for(env)
    assert option(args, "--nnodes") == "4"
    assert option(args, "--node-rank") == "2"
    assert option(args, "--nproc-per-node") == "8"
    assert option(args, "--master-addr") == "nav-master-0"
    assert option(args, "--master-port") == "23456"
    assert option(args, "--max-restarts") == "0"
    assert "--rdzv-endpoint" not in args
    assert args[-5:] == ["--module", "janus_job.cli", "train", "--spec", "/etc/janus/job.yaml"]


def test_older_operator_without_pet_variables_uses_pod_rank_and_world_size():
    env = {"RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "nav-master-0", "MASTER_PORT": "23456"}
    args = args_for(env, default_nproc=4)
    assert (option(args, "--nnodes"), option(args, "--node-rank"), option(args, "--nproc-per-node")) == ("3", "1", "4")


def test_elastic_job_uses_the_operators_rendezvous():
    env = {"PET_NNODES": "1:4", "PET_NPROC_PER_NODE": "8", "PET_RDZV_BACKEND": "c10d",
           "PET_RDZV_ENDPOINT": "nav-worker-0:29400", "PET_RDZV_ID": "nav-7f3a", "PET_MAX_RESTARTS": "0",
           "PET_RDZV_CONF": "join_timeout=600"}
    args = args_for(env)
    assert option(args, "--nnodes") == "1:4"
    assert option(args, "--rdzv-backend") == "c10d"
    assert option(args, "--rdzv-endpoint") == "nav-worker-0:29400"
    assert option(args, "--rdzv-id") == "nav-7f3a"
    assert option(args, "--rdzv-conf") == "join_timeout=600"
    assert option(args, "--max-restarts") == "0"
    assert "--node-rank" not in args  # the c10d rendezvous assigns node ranks


def test_elastic_defaults_come_from_the_spec():
    args = args_for({"PET_NNODES": "2:4", "PET_RDZV_ENDPOINT": "nav-worker-0:29400"}, max_restarts=7)
    assert option(args, "--rdzv-backend") == "c10d"
    assert option(args, "--rdzv-id") == "nav"
    assert option(args, "--max-restarts") == "7"


def test_auto_nproc_means_the_specs_gpus_per_node():
    args = args_for({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "auto"}, default_nproc=8)
    assert option(args, "--nproc-per-node") == "8"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PET_NNODES": "two"}, "PET_NNODES='two' must be a node count"),
        ({"PET_NNODES": "4:2", "PET_RDZV_ENDPOINT": "x:1"}, "min is larger than max"),
        ({"PET_NNODES": "1:4"}, "PET_RDZV_ENDPOINT is not set"),
        ({"PET_NNODES": "2", "PET_MASTER_ADDR": "a", "PET_MASTER_PORT": "1"}, "neither PET_NODE_RANK nor RANK"),
        ({"PET_NNODES": "2", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "a", "PET_MASTER_PORT": "1"},
         "node rank 2 is not below the node count 2"),
        ({"PET_NNODES": "2", "PET_NODE_RANK": "1"}, "PET_MASTER_ADDR/PET_MASTER_PORT"),
        ({"PET_NPROC_PER_NODE": "cpu"}, "PET_NPROC_PER_NODE='cpu'"),
        ({"PET_NNODES": "2", "PET_NODE_RANK": "x"}, "PET_NODE_RANK='x' is not a whole number"),
    ],
)
def test_bad_operator_variables_are_named(env, message):
    with pytest.raises(JobError, match=message.replace("(", r"\(").replace("?", r"\?")):
        args_for(env)


# ---------------------------------------------------------------- two nodes, as the PyTorchJob starts them


@pytest.mark.slow
def test_runtime_defaults_allocator_and_cpu_adam_threads():
    from tests.test_deepspeed import make

    plain = make()
    assert runtime_defaults(plain, nproc=8, cpus=96) == {
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", ALLOCATOR_ENV: ALLOCATOR_DEFAULT,
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(plain.cluster.termination_grace_seconds - 15)}
    offload = make(deepspeed={"offload_optimizer": "cpu", "optimizer": "deepspeed"})
    assert runtime_defaults(offload, nproc=8, cpus=96)["OMP_NUM_THREADS"] == "12"
    assert runtime_defaults(offload, nproc=8, cpus=4)["OMP_NUM_THREADS"] == "1"


@pytest.mark.slow
def test_two_nodes_started_like_the_pytorchjob_train_together(tmp_path):
    """Two `janus-job launch` processes with the operator's variables (PET_NNODES=2, PET_NODE_RANK,
    PET_NPROC_PER_NODE=1, PET_MASTER_ADDR/PORT, plus the pod-level RANK/WORLD_SIZE the operator also
    sets) run real DeepSpeed ZeRO-1 (the default) over gloo on a tiny model and agree on loss and weights."""
    import os
    import re
    import subprocess

    from janus_job.demo.run import precompute_features, prepare_job

    spec = prepare_job(tmp_path, steps=3, gpu=False, nodes=2, micro_batch_size=1, global_batch_size=4)
    precompute_features(spec)
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PET_", "JANUS_")) and k not in ("LOCAL_RANK", "CUDA_VISIBLE_DEVICES")}
        env.update(
            PET_NNODES="2", PET_NODE_RANK=str(node_rank), PET_NPROC_PER_NODE="1",
            PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(node_rank), WORLD_SIZE="2",
            PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
            JANUS_METRICS_FILE=str(tmp_path / "metrics-{rank}.jsonl"),
        )
        nodes.append(subprocess.Popen([*JANUS_JOB, "launch", "--spec", str(spec)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=420)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node_rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {node_rank}:\n{out}"
        assert f"--node-rank {node_rank}" in out  # torchrun got the node rank, not a process rank
        assert f"train start job=janus-demo world=2 node={node_rank}" in out
        assert ("janus-job launch: network preset=tcp check=error TORCH_NCCL_ASYNC_ERROR_HANDLING=1 "
                "NCCL_IB_DISABLE=1") in out
    # the transport check ran inside the trainer's process group start: one line for the job, from rank 0
    checks = [l for out in outputs for l in out.splitlines() if l.startswith("network transport=")]
    assert len(checks) == 1 and re.match(r"network transport=gloo nodes=2 ranks=2 busbw=[0-9.]+GB/s expected>=n/a ok$",
                                         checks[0]), checks

    def losses(out: str) -> list[float]:
        return [float(m) for m in re.findall(r"^train step=\d+/3 .* loss=([-\d.]+) ", out, re.M)]

    def param_norm(out: str) -> str:
        found = re.findall(r"^train done step=3 rank=\d param_norm=(\S+)$", out, re.M)
        assert len(found) == 1, out
        return found[0]

    first, second = losses(outputs[0]), losses(outputs[1])
    assert len(first) == 3 and all(abs(x) < 1e6 and x == x for x in first), outputs[0]
    assert first == second  # the logged loss is the mean over both ranks: both nodes print it
    assert param_norm(outputs[0]) == param_norm(outputs[1])  # ZeRO-2 replicas stayed identical
    for rank in (0, 1):
        assert len((tmp_path / f"metrics-{rank}.jsonl").read_text().splitlines()) == 4  # 3 steps + done

    # the job ends with an export (training.export) of its ZeRO-1 checkpoint of two ranks, written by rank 0
    import yaml
    from test_export import STEP, check_export

    values = yaml.safe_load(spec.read_text())
    assert values["deepspeed"].get("zero_stage", 1) == 1 and values["training"].get("export", True)
    root = Path(values["training"]["checkpoint"]["url"])
    assert "saved at world size 2, ZeRO-1)" in outputs[0]
    assert f"export done step=3 url={root}/export/{STEP}" in outputs[0]
    assert "export done" not in outputs[1]
    assert [p.name for p in (root / "export").iterdir()] == [STEP]  # no temporary left
    assert len([p for p in (root / STEP).iterdir() if p.name.endswith("optim_states.pt")]) == 2  # one per rank
    check_export(root / "export" / STEP, root, values)

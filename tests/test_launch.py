"""`janus-job launch`: the PyTorchJob operator's variables become the right torchrun command."""

from __future__ import annotations

import pytest

from janus_job.errors import JobError
from janus_job.launch import torchrun_arguments


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
    assert args[-4:] == ["--module", "janus_job.train", "--spec", "/etc/janus/job.yaml"]


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

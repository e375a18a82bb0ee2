"""The process group: torchrun's variables (or a one-rank group for the demo) -> ranks and device."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any


@dataclass
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def prints(self) -> bool:
        """The first rank of every node prints (each pod's `kubectl logs` shows the line)."""
        return self.local_rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def skip_cpu_shm_collectives() -> None:
    """Keeps DeepSpeed's CPU shared-memory collective op out of a CPU process group.

    DeepSpeed builds that op on every CPU `init_distributed`, through torch's extension loader, which
    takes a lock file on each load even when the op is built; a rank killed while holding it (a crash,
    a preemption, a test's kill) leaves the lock behind and every later CPU run waits on it forever.
    The op only serves DeepSpeed's inference all-reduce; training's collectives are gloo's either way.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> tuple[Ranks, Any]:
    """Joins the process group torchrun describes (or makes a one-rank group); returns the device."""
    import torch

    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    ranks = Ranks(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
        device, backend = torch.device("cuda", ranks.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(1, ranks.local_world_size)))
        skip_cpu_shm_collectives()
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    return ranks, device

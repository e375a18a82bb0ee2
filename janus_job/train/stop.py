"""A SIGTERM (pod deleted, node drained, job scaled down) becomes a checkpoint, not lost work.

torchrun forwards the pod's SIGTERM to its ranks. Each rank only notes it; at the next optimizer-
step boundary the ranks learn through one all-reduce whether any of them (on any node) was asked
to stop, so they all save the same step together, wait for the upload, and exit with 143 (what a
SIGTERM-killed process reports): a non-zero exit, so the pod is restarted and resumes there
instead of being marked succeeded.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

EXIT_CODE = 128 + int(signal.SIGTERM)


class StopRequest:
    """Notes SIGTERM; `agreed()` tells every rank whether any rank got it."""

    def __init__(self) -> None:
        self.received = False

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = True

    def agreed(self, device: Any) -> bool:
        """All ranks call it at the same point; True on every rank if any rank got SIGTERM."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def own_process_group(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: torchrun SIGTERMs a rank's whole process group, and a loader
    worker killed by it would fail the rank's step before it can be checkpointed. In a group of
    its own the worker is still ended by its rank (DataLoader shutdown, multiprocessing's exit
    handler) or, when the rank is gone, by the DataLoader's parent watchdog."""
    os.setpgid(0, 0)

"""The end of a finished rank: everything the run started is finished and released, in order,
while the interpreter is still whole, so the rank exits 0.

Why this matters: the gloo process group runs each collective on worker threads of its own
(ProcessGroupGloo's run loop). A worker drops its reference to the collective it just ran (and to
the tensors in it) only after it has already woken the caller, so right after the last
collective of a run it may still hold the last reference to a tensor whose Python object torch
keeps alive on the C++ side. When the rank returns from `main` at that moment, the worker frees
that tensor during interpreter finalization, needs the GIL to do so, and the thread is torn down
inside a C++ destructor: `terminate called without an active exception`, SIGABRT, a failed pod
after a finished job. The worker threads are joined only by the process group's destructor, and
DeepSpeed keeps its own clone of the world group alive in a module global, so
`destroy_process_group()` alone does not stop them.

`finish_rank` therefore, after the last step: waits for the checkpoint upload, shuts the data
loader's workers down, lines all ranks up (no rank tears down while another is still in a
collective), destroys the DeepSpeed engine, drops DeepSpeed's group clone, destroys every process
group and collects garbage (the process groups' destructors join their worker threads here, with
the interpreter alive), then flushes stdout and stderr.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from typing import Any

GLOO_WORKER_THREAD = "pt_gloo_runloop"  # the name torch gives ProcessGroupGloo's worker threads


def finish_rank(owner: Any = None, *, checkpoints: Any = None, batches: Iterator | None = None) -> None:
    """The orderly end of a rank that finished its work; every rank calls it at the same point.

    `owner` holds the DeepSpeed engine as `.engine` (the trainer): the reference is dropped here,
    so the engine and the process groups it holds can be freed before the groups are destroyed.
    """
    if checkpoints is not None:
        checkpoints.wait()  # the upload and, on rank 0, the COMPLETE marker
    if batches is not None and hasattr(batches, "close"):
        batches.close()  # ends the loader's iterator: its worker processes are shut down and joined
    release_distributed(_take_engine(owner))  # no frame here keeps a reference to the engine
    sys.stdout.flush()
    sys.stderr.flush()


def _take_engine(owner: Any) -> Any:
    engine = getattr(owner, "engine", None)
    if engine is not None:
        owner.engine = None
    return engine


def release_distributed(engine: Any = None) -> None:
    """Barrier, DeepSpeed engine, DeepSpeed's world-group clone, every process group, then a
    garbage collection so the process groups' destructors join their threads now."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if engine is not None:
            engine.destroy()
        return
    dist.barrier()
    if engine is not None:
        engine.destroy()
        del engine
    _drop_deepspeed_groups()
    dist.destroy_process_group()
    gc.collect()


def _drop_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals (`_WORLD_GROUP`, `_*_GROUP` dicts); the
    groups' destructors cannot run while those references live."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    from torch.distributed import ProcessGroup

    for name, value in list(vars(groups).items()):
        if not name.startswith("_") or not name.endswith(("_GROUP", "_GROUPS", "_GROUP_DICT")):
            continue
        if isinstance(value, ProcessGroup):
            setattr(groups, name, None)
        elif isinstance(value, dict) and any(isinstance(v, ProcessGroup) for v in value.values()):
            value.clear()


def gloo_worker_threads() -> int:
    """How many ProcessGroupGloo worker threads this process still has (Linux; 0 elsewhere)."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as handle:
                count += handle.read().strip() == GLOO_WORKER_THREAD
        except OSError:
            continue
    return count

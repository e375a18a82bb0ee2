"""The end of a finished rank: everything the run started is finished and released, in order,
while the interpreter is still whole, so the rank exits 0.

Why this matters: the gloo process group runs each collective on worker threads of its own
(ProcessGroupGloo's run loop). A worker drops its reference to the collective it just ran (and to
the tensors in it) only after it has already woken the caller, so right after the last
collective of a run it may still hold the last reference to a tensor whose Python object torch
keeps alive on the C++ side. When the rank returns from `main` at that moment, the worker frees
that tensor during interpreter finalization, needs the GIL to do so, and the thread is torn down
inside a C++ destructor: `terminate called without an active exception`, SIGABRT, a failed pod
after a finished job. The worker threads are joined only by the process group's destructor
(`ProcessGroup.shutdown()` does not stop gloo's), and module-level references keep the groups
alive past `destroy_process_group()`: DeepSpeed's own clone of the world group in
`deepspeed.utils.groups`; default arguments bound to the world group at import time
(`torch.distributed.nn.functional` declares `group=group.WORLD` on every collective, and DeepSpeed
imports it during `initialize`, after the world group exists); and, under ZeRO-3, DeepSpeed's
forward module stack and a method cache keyed by module, which keep the wrapped model and through
its hooks the engine.

`finish_rank` therefore, after the last step: waits for the checkpoint upload, shuts the data
loader's workers down, lines all ranks up (no rank tears down while another is still in a
collective), destroys the DeepSpeed engine, drops DeepSpeed's group clones, ZeRO-3's module
stack and method caches and the group-valued default arguments of loaded modules, destroys every
process group and collects garbage (the process groups' destructors join their worker threads
here, with the interpreter alive), then flushes stdout and stderr. `gloo_worker_threads()` is 0
afterwards; the tests hold it to that.
"""

from __future__ import annotations

import gc
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

GLOO_WORKER_THREAD = "pt_gloo_runloop"  # the name torch gives ProcessGroupGloo's worker threads


def finish_rank(owner: Any = None, *, checkpoints: Any = None, batches: Iterator | None = None) -> int:
    """The orderly end of a rank that finished its work; every rank calls it at the same point.

    `owner` holds the DeepSpeed engine as `.engine` (the trainer): the reference is dropped here,
    so the engine and the process groups it holds can be freed before the groups are destroyed.
    Returns how many gloo worker threads are left (0 unless something still holds a process group,
    which is then reported on stderr).
    """
    if checkpoints is not None:
        checkpoints.wait()  # the upload and, on rank 0, the COMPLETE marker
    if batches is not None and hasattr(batches, "close"):
        batches.close()  # ends the loader's iterator: its worker processes are shut down and joined
    release_distributed(_take_engine(owner))  # no frame here keeps a reference to the engine
    left = gloo_worker_threads()
    if left:
        sys.stderr.write(f"warning: {left} collective worker threads outlive the process groups (something still "
                         "holds a group); the rank may abort at exit\n")  # one write: ranks share the stream
    sys.stdout.flush()
    sys.stderr.flush()
    return left


def _take_engine(owner: Any) -> Any:
    engine = getattr(owner, "engine", None)
    if engine is not None:
        owner.engine = None
    return engine


def release_distributed(engine: Any = None) -> None:
    """Barrier, DeepSpeed engine, the module-level references that hold process groups (this module's
    docstring), every process group, then a garbage collection so the process groups' destructors
    join their threads now."""
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
    _drop_deepspeed_module_stack()
    _clear_deepspeed_caches()
    dist.destroy_process_group()
    _drop_group_defaults()
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


def _drop_deepspeed_module_stack() -> None:
    """ZeRO-3 pushes the top module onto `parameter_offload.FWD_MODULE_STACK` when it wraps the model
    and never pops it; through the module's hooks that entry holds the engine, its optimizer and
    their process groups."""
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    stack = getattr(offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack.clear()


def _clear_deepspeed_caches() -> None:
    """Empties the `functools.lru_cache`s of DeepSpeed's functions and methods: ZeRO-3's parameter
    coordinator caches `__params_to_release(self, module, step)` on the class, so its keys hold the
    coordinator, the wrapped modules and through their hooks the engine for the life of the process."""
    for name, module in _loaded_modules(("deepspeed",)):
        for value in list(vars(module).values()):
            members = vars(value).values() if isinstance(value, type) and value.__module__ == name else (value,)
            for member in list(members):
                for cache in _lru_caches(member):
                    cache.cache_clear()


def _loaded_modules(prefixes: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """(name, module) of every loaded module whose name starts with one of `prefixes`."""
    for name, module in list(sys.modules.items()):
        if module is not None and name.startswith(prefixes):
            yield name, module


def _lru_caches(value: Any, depth: int = 0) -> Iterator[Any]:
    """The lru_cache wrappers in `value` or in the closures of the decorators wrapped around it."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if hasattr(value, "cache_clear") and hasattr(value, "cache_info"):
        yield value
    if depth < 3 and isinstance(value, types.FunctionType):
        for cell in value.__closure__ or ():
            try:
                inner = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(inner):
                yield from _lru_caches(inner, depth + 1)


_DEFAULT_HOLDERS = ("torch.distributed", "deepspeed", "janus_job")


def _drop_group_defaults() -> None:
    """Default arguments that hold a process group (`def broadcast(..., group=group.WORLD)` imported
    after the group existed) are set to None, which every torch.distributed call reads as the default
    group; the group itself can then be freed."""
    from torch.distributed import ProcessGroup

    for _, module in _loaded_modules(_DEFAULT_HOLDERS):
        for value in list(vars(module).values()):
            if type(value) is not types.FunctionType:  # type(): no attribute access on lazy objects
                continue
            defaults = value.__defaults__
            if defaults and any(isinstance(d, ProcessGroup) for d in defaults):
                value.__defaults__ = tuple(None if isinstance(d, ProcessGroup) else d for d in defaults)
            kwdefaults = value.__kwdefaults__
            if kwdefaults and any(isinstance(d, ProcessGroup) for d in kwdefaults.values()):
                value.__kwdefaults__ = {k: None if isinstance(d, ProcessGroup) else d for k, d in kwdefaults.items()}


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

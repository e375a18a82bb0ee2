"""Atomic, resumable, resizable training checkpoints on an fsspec URL (s3:// or a mounted path).

Layout under the checkpoint URL::

    step-00000300/                      one checkpoint (= the DeepSpeed tag directory)
        mp_rank_00_model_states.pt      DeepSpeed files, as engine.save_checkpoint wrote them
        zero_pp_rank_<r>_mp_rank_00_optim_states.pt
        rng-rank-<r>.pt                 python/numpy/torch/cuda RNG states of rank r
        done/rank-<r>.json              rank r finished uploading (its files and sizes)
        COMPLETE                        manifest, written last by rank 0: the checkpoint exists

A checkpoint counts only when ``COMPLETE`` exists; everything else is an interrupted save and is
never resumed from (and is deleted by later saves).

Saving: every rank writes its own DeepSpeed shard to node-local staging (no rank ever gathers the
model), then uploads its files one by one in a background thread (deleting each local copy once
uploaded) and writes its ``done`` marker.
Rank 0's thread waits for all markers and writes ``COMPLETE`` last, then prunes to the newest
``keep`` checkpoints. Training is held only for the local write.

Resuming at the saved world size: DeepSpeed reads the checkpoint in place on a mounted path; from
object storage each rank fetches its own shard and the shared files (once per node) to staging.
At a different world size the checkpoint is converted, once per node, into DeepSpeed's universal
(per-parameter) layout and loaded with ``load_universal``, which reshards the fp32 master weights
and Adam moments to the new data-parallel size.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from janus_job.errors import JobError
from janus_job.io import url_to_fs

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
# DeepSpeed names a rank's optimizer shard zero_pp_rank_N_..., bf16_zero_pp_rank_N_... under bf16
RANK_FILE = re.compile(r"(?:^(?:bf16_)?zero_pp_rank_(\d+)_)|(?:^rng-rank-(\d+)\.pt$)")
COMPLETE = "COMPLETE"
DONE_DIR = "done"
MANIFEST_FORMAT = 1
# Keys this module adds to DeepSpeed's client_state; stripped before load() returns it.
_LR_KEY = "janus_lr_scheduler"
_META_KEY = "janus_checkpoint"


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint: its URL, step and the manifest rank 0 wrote last."""

    url: str
    step: int
    world_size: int
    manifest: dict = field(repr=False)


def _url_to_fs(url: str, storage_options: dict | None, endpoint_url: str | None = None):
    try:
        return url_to_fs(url, endpoint_url, **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise JobError(f"checkpoint url {url!r} cannot be opened: {err}") from err


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def capture_rng_state() -> dict:
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[0])


def reseed_rng(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


class CheckpointManager:
    """Periodic atomic checkpoints of a DeepSpeed engine; exact resume, also at a new world size.

    All ranks construct it with the same arguments and call ``save``/``load``/``latest`` together.
    Call ``wait()`` before the process exits so that the last upload finishes.
    """

    def __init__(
        self,
        url: str,
        keep: int,
        interval_steps: int,
        *,
        rank: int,
        world_size: int,
        local_rank: int | None = None,
        staging_dir: str | os.PathLike | None = None,
        storage_options: dict | None = None,
        endpoint_url: str | None = None,
        async_upload: bool = True,
        exclude_frozen_parameters: bool = True,
        finalize_timeout_s: float = 3600.0,
    ):
        if keep < 1:
            raise JobError(f"checkpoint.keep must be >= 1 (got {keep})")
        if interval_steps < 1:
            raise JobError(f"checkpoint.interval_steps must be >= 1 (got {interval_steps})")
        self.url = url.rstrip("/")
        self.keep = keep
        self.interval_steps = interval_steps
        self.rank = rank
        self.world_size = world_size
        self.local_rank = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
        self.staging = Path(
            staging_dir or os.environ.get("JANUS_CHECKPOINT_STAGING") or "/tmp/janus-checkpoint-staging"
        )
        self.fs, self.root = _url_to_fs(self.url, storage_options, endpoint_url)
        self.async_upload = async_upload
        self.exclude_frozen_parameters = exclude_frozen_parameters
        self.finalize_timeout_s = finalize_timeout_s
        self.last_load_stats: dict = {}
        self._upload: threading.Thread | None = None
        self._upload_error: BaseException | None = None
        self.last_save_stats: dict = {}

    # ---------------------------------------------------------------- discovery

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.interval_steps == 0

    def _step_dirs(self) -> dict[int, str]:
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return {}
        found = {}
        for entry in entries:
            match = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match:
                found[int(match.group(1))] = entry.rstrip("/")
        return found

    def _read_manifest(self, step_path: str) -> dict | None:
        marker = _join(step_path, COMPLETE)
        self.fs.invalidate_cache(step_path)
        try:
            with self.fs.open(marker, "rb") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as err:
            log.warning("ignoring checkpoint %s: unreadable %s (%s)", step_path, COMPLETE, err)
            return None
        return manifest if manifest.get("format") == MANIFEST_FORMAT else None

    def _verify(self, step_path: str, manifest: dict) -> bool:
        sizes = {
            info["name"].rstrip("/").rsplit("/", 1)[-1]: info.get("size") for info in self.fs.ls(step_path, detail=True)
        }
        missing = [n for n, s in manifest["files"].items() if sizes.get(n) != s]
        if missing:
            log.warning("ignoring checkpoint %s: files missing or of wrong size: %s", step_path, missing)
        return not missing

    def complete_checkpoints(self) -> list[CheckpointRef]:
        """All complete checkpoints, oldest first (lists the store; call on any one rank)."""
        refs = []
        for step, path in sorted(self._step_dirs().items()):
            manifest = self._read_manifest(path)
            if manifest is not None and self._verify(path, manifest):
                refs.append(CheckpointRef(self._url_of(path), step, manifest["world_size"], manifest))
        return refs

    def _url_of(self, path: str) -> str:
        return _join(self.url, path.rstrip("/").rsplit("/", 1)[-1])

    def latest(self) -> CheckpointRef | None:
        """The newest complete checkpoint (rank 0 decides, all ranks get the same answer)."""
        dist = _dist()
        choice: list[Any] = [None]
        if dist is None or dist.get_rank() == 0:
            refs = self.complete_checkpoints()
            choice[0] = refs[-1] if refs else None
        if dist is not None:
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def ref_for_step(self, step: int) -> CheckpointRef:
        """The complete checkpoint of ``step`` (for resuming by hand), or a JobError."""
        for ref in self.complete_checkpoints():
            if ref.step == step:
                return ref
        raise JobError(
            f"no complete checkpoint for step {step} under {self.url}; complete ones: "
            f"{[r.step for r in self.complete_checkpoints()] or 'none'}"
        )

    def retire_newer_than(self, step: int) -> list[int]:
        """Makes the checkpoint of ``step`` the newest complete one by renaming the COMPLETE
        marker of every newer checkpoint to RETIRED (resume by hand; call with the job stopped).
        Returns the retired steps. Later saves overwrite or prune the retired ones."""
        self.ref_for_step(step)  # JobError unless it exists and is complete
        retired = []
        for ref in self.complete_checkpoints():
            if ref.step > step:
                path = _join(self.root, step_tag(ref.step))
                self.fs.mv(_join(path, COMPLETE), _join(path, f"RETIRED-{int(time.time())}"))
                retired.append(ref.step)
        return retired

    # --------------------------------------------------------------------- save

    def save(self, engine, step: int, client_state: dict, *, lr_scheduler=None) -> None:
        """Checkpoint ``engine`` at ``step``; all ranks call it. Returns once the local write is done
        (the upload continues in the background when ``async_upload``)."""
        import torch

        t0 = time.perf_counter()
        self.wait()  # one checkpoint in flight at a time; re-raises a failed upload
        tag = step_tag(step)
        target = _join(self.root, tag)
        if self.rank == 0 and self.fs.exists(target):
            # a leftover of an interrupted save of this same step (maybe at another world size)
            self.fs.rm(target, recursive=True)
        local = self.staging / "save" / tag / f"rank-{self.rank:05d}"
        if local.exists():
            shutil.rmtree(local)
        local.mkdir(parents=True)
        _barrier()
        t_wait = time.perf_counter()

        state = dict(client_state)
        state[_META_KEY] = {"step": step, "world_size": self.world_size}
        if lr_scheduler is not None:
            state[_LR_KEY] = lr_scheduler.state_dict()
        engine.save_checkpoint(
            str(local),
            tag=tag,
            client_state=state,
            save_latest=False,
            exclude_frozen_parameters=self.exclude_frozen_parameters,
        )
        written = local / tag
        torch.save(capture_rng_state(), written / f"rng-rank-{self.rank:05d}.pt")
        t_local = time.perf_counter()
        self.last_save_stats = {
            "step": step,
            "wait_previous_s": t_wait - t0,
            "local_write_s": t_local - t_wait,
            "local_bytes": sum(p.stat().st_size for p in written.iterdir() if p.is_file()),
        }
        meta = {
            "step": step,
            "world_size": self.world_size,
            "zero_stage": _zero_stage(engine),
            "global_batch_size": engine.train_batch_size(),
        }
        self._upload_error = None
        if self.async_upload:
            self._upload = threading.Thread(
                target=self._upload_and_finalize,
                args=(written, target, meta),
                daemon=True,
                name=f"checkpoint-upload-{step}",
            )
            self._upload.start()
        else:
            self._upload_and_finalize(written, target, meta)
            self._raise_upload_error()
        self.last_save_stats["blocking_s"] = time.perf_counter() - t0

    def wait(self) -> None:
        """Blocks until the background upload (and, on rank 0, the COMPLETE marker) is done."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        self._raise_upload_error()

    def _raise_upload_error(self) -> None:
        if self._upload_error is not None:
            err, self._upload_error = self._upload_error, None
            raise JobError(f"checkpoint upload to {self.url} failed: {err}") from err

    def _upload_and_finalize(self, written: Path, target: str, meta: dict) -> None:
        try:
            t0 = time.perf_counter()
            files = {}
            self.fs.makedirs(target, exist_ok=True)
            for path in sorted(written.iterdir()):
                if path.is_file():
                    self.fs.put_file(str(path), _join(target, path.name))
                    files[path.name] = path.stat().st_size
                    path.unlink()  # local disk holds at most one checkpoint shard
                    self._after_file_uploaded(meta["step"], path.name)
            self._write_small(_join(target, DONE_DIR, f"rank-{self.rank:05d}.json"), {"files": files})
            self.last_save_stats["upload_s"] = time.perf_counter() - t0
            if self.rank == 0:
                self._finalize(target, meta)
                self.last_save_stats["finalized_s"] = time.perf_counter() - t0
            self._prune_staging(keep=written.parent.parent.name)
        except BaseException as err:  # surfaced by wait()/the next save()
            log.error("checkpoint upload of %s failed: %s", target, err)
            self._upload_error = err

    def _after_file_uploaded(self, step: int, name: str) -> None:
        """Hook for fault-injection in tests; does nothing."""

    def _write_small(self, path: str, obj: dict) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        if _is_local(self.fs):
            tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic on one filesystem
        else:
            self.fs.pipe_file(path, data)  # an object PUT is atomic

    def _finalize(self, target: str, meta: dict) -> None:
        done = _join(target, DONE_DIR)
        deadline = time.monotonic() + self.finalize_timeout_s
        while True:
            self.fs.invalidate_cache(done)
            try:
                names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(done, detail=False)]
            except FileNotFoundError:
                names = []
            markers = sorted(n for n in names if n.endswith(".json"))
            if len(markers) >= self.world_size:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(markers)}/{self.world_size} ranks uploaded {target}")
            time.sleep(0.2)
        files = {}
        for name in markers:
            with self.fs.open(_join(done, name), "rb") as f:
                files.update(json.loads(f.read())["files"])
        manifest = {
            "format": MANIFEST_FORMAT,
            **meta,
            "files": files,
            "total_bytes": sum(files.values()),
            "created_unix": time.time(),
            "deepspeed": _deepspeed_version(),
        }
        if not self._verify(target, manifest):
            raise RuntimeError(f"uploaded files of {target} do not match the rank markers")
        self._write_small(_join(target, COMPLETE), manifest)
        log.info("checkpoint %s complete (%d files, %.1f MB)", target, len(files), manifest["total_bytes"] / 1e6)
        self._prune_store(meta["step"])

    def _prune_store(self, newest_step: int) -> None:
        """Keeps the newest ``keep`` complete checkpoints; deletes older and interrupted ones."""
        complete = []
        for step, path in sorted(self._step_dirs().items()):
            if step > newest_step:
                continue  # never touch what a later save may be writing
            if self._read_manifest(path) is None:
                if step < newest_step:
                    self.fs.rm(path, recursive=True)
            else:
                complete.append(path)
        for path in complete[: -self.keep]:
            # the marker goes first, so a half-deleted checkpoint is never taken for complete
            self.fs.rm(_join(path, COMPLETE))
            self.fs.rm(path, recursive=True)

    def _prune_staging(self, keep: str) -> None:
        save_dir = self.staging / "save"
        for entry in save_dir.iterdir() if save_dir.exists() else ():
            if entry.name != keep:
                shutil.rmtree(entry / f"rank-{self.rank:05d}", ignore_errors=True)
                try:
                    entry.rmdir()
                except OSError:
                    pass

    # --------------------------------------------------------------------- load

    def load(self, engine, ref: CheckpointRef, *, lr_scheduler=None, reshard: bool | None = None) -> dict:
        """Restores engine (weights, optimizer, scheduler) and this rank's RNG from ``ref``;
        returns the client_state given to ``save``. All ranks call it.

        ``reshard`` None: go through the universal layout only when the world size changed;
        True: always (e.g. to check a checkpoint loads at any size)."""
        import torch

        saved_world = ref.world_size
        saved_batch = ref.manifest.get("global_batch_size")
        if saved_batch is not None and saved_batch != engine.train_batch_size():
            raise JobError(
                f"checkpoint {ref.url} was trained with global batch {saved_batch} but this run uses "
                f"{engine.train_batch_size()}; resume keeps the global batch: set "
                f"training.global_batch_size: {saved_batch} (accumulation is derived per world size)"
            )
        resharding = saved_world != self.world_size if reshard is None else reshard
        t0 = time.perf_counter()
        source = self._local_source(ref, fetch_all=resharding)
        t_fetch = time.perf_counter()

        engine_config = engine._config
        if resharding:
            universal = self.staging / "universal" / source.name
            if self.local_rank == 0:
                _convert_to_universal(source, universal, stamp=_stamp(ref))
            _barrier()
            t_convert = time.perf_counter()
            engine_config.load_universal_checkpoint = True
            try:
                path, client_state = engine.load_checkpoint(
                    str(universal.parent), tag=universal.name, load_module_strict=not self.exclude_frozen_parameters
                )
            finally:
                engine_config.load_universal_checkpoint = False
        else:
            t_convert = time.perf_counter()
            path, client_state = engine.load_checkpoint(
                str(source.parent), tag=source.name, load_module_strict=not self.exclude_frozen_parameters
            )
        if path is None:
            raise JobError(f"DeepSpeed could not load checkpoint {ref.url}")
        if resharding:
            _optimizer_steps_on_parameter_devices(engine)
        rng_file = source / f"rng-rank-{self.rank:05d}.pt"
        if rng_file.exists():
            restore_rng_state(torch.load(rng_file, weights_only=False))
        else:
            # a rank that did not exist at the saved size: a fresh stream, derived deterministically
            reseed_rng(1_000_003 * ref.step + self.rank)
        client_state = dict(client_state or {})
        lr_state = client_state.pop(_LR_KEY, None)
        if lr_scheduler is not None and lr_state is not None:
            lr_scheduler.load_state_dict(lr_state)
        client_state.pop(_META_KEY, None)
        _barrier()
        self.last_load_stats = {
            "step": ref.step,
            "resharded": resharding,
            "fetch_s": t_fetch - t0,
            "convert_s": t_convert - t_fetch,
            "engine_load_s": time.perf_counter() - t_convert,
            "total_s": time.perf_counter() - t0,
        }
        log.info(
            "rank %d resumed from %s (step %d, saved at world size %d, now %d%s)",
            self.rank,
            ref.url,
            ref.step,
            saved_world,
            self.world_size,
            ", resharded" if resharding else "",
        )
        return client_state

    def _local_source(self, ref: CheckpointRef, *, fetch_all: bool) -> Path:
        """A local directory holding the files this rank needs: the checkpoint itself on a mounted
        path, else a node-local copy (shared files fetched once per node, shards by their rank)."""
        tag = step_tag(ref.step)
        if _is_local(self.fs):
            return Path(self.root) / tag
        load_root = self.staging / "load"
        local = load_root / f"{tag}-{_stamp(ref)}"
        if self.local_rank == 0:
            for old in load_root.iterdir() if load_root.exists() else ():
                if old != local:
                    shutil.rmtree(old, ignore_errors=True)
        _barrier()
        local.mkdir(parents=True, exist_ok=True)
        for name, size in ref.manifest["files"].items():
            owner = _rank_of_file(name)
            mine = self.local_rank == 0 if (fetch_all or owner is None) else owner == self.rank
            if mine:
                self._fetch(_join(self.root, tag, name), local / name, size)
        _barrier()
        return local

    def _fetch(self, remote: str, local: Path, size: int) -> None:
        if local.exists() and local.stat().st_size == size:
            return
        tmp = local.with_name(local.name + f".part-{os.getpid()}")
        self.fs.get_file(remote, str(tmp))
        if tmp.stat().st_size != size:
            raise JobError(f"checkpoint file {remote} has {tmp.stat().st_size} bytes, manifest says {size}")
        os.replace(tmp, local)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _stamp(ref: CheckpointRef) -> str:
    """Tells apart two checkpoints of the same step (one re-saved after a resume from an older one)."""
    return str(int(float(ref.manifest.get("created_unix", 0)) * 1000))


def _rank_of_file(name: str) -> int | None:
    match = RANK_FILE.match(name)
    if not match:
        return None
    return int(match.group(1) or match.group(2))


def _zero_stage(engine) -> int:
    try:
        return int(engine.zero_optimization_stage())
    except Exception:  # noqa: BLE001 - a non-ZeRO engine
        return 0


def _deepspeed_version() -> str:
    try:
        import deepspeed

        return deepspeed.__version__
    except ImportError:
        return "unknown"


def _optimizer_steps_on_parameter_devices(engine) -> None:
    """torch's fused (and capturable) AdamW keeps each parameter's `step` count on the parameter's
    device; DeepSpeed's universal-checkpoint load restores it as a CPU tensor, and the first optimizer
    step after a resize on GPUs would fail ("state_steps is on cpu"). Non-fused optimizers keep it on
    the CPU and are left alone."""
    import torch

    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    defaults = getattr(optimizer, "defaults", {})
    if not (defaults.get("fused") or defaults.get("capturable")):
        return
    for param, state in optimizer.state.items():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.device != param.device:
            state["step"] = step.to(device=param.device, dtype=torch.float32)


def _convert_to_universal(ds_dir: Path, out_dir: Path, stamp: str) -> None:
    """DeepSpeed checkpoint dir -> universal layout, once per node (a marker file says done)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    done = out_dir / ".converted"
    if done.exists() and done.read_text().split()[0] == stamp:
        return
    if out_dir.parent.exists():
        shutil.rmtree(out_dir.parent)  # older conversions: one is kept at a time
    out_dir.parent.mkdir(parents=True)
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    args = argparse.Namespace(
        input_folder=str(ds_dir),
        output_folder=str(out_dir),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    t0 = time.perf_counter()
    ds_to_universal.main(args)
    # the per-rank RNG files are not DeepSpeed's; they stay in ds_dir
    done.write_text(f"{stamp} {time.perf_counter() - t0:.3f}\n")

"""Per-rank GPU stats files, written by the trainer and read by the monitor sidecar.

Each rank owns one file, `rank-<N>.json`, in a directory shared with the sidecar (an `emptyDir`).
It is replaced atomically (temp file, then `os.replace`), so a reader sees either the previous or
the new content. The GPU figures come from NVML for this rank's own GPU (its CUDA device, found by
UUID or PCI bus id, so `CUDA_VISIBLE_DEVICES` is respected) and from torch's caching allocator.

Nothing here may stop training: a missing GPU, a broken NVML or an unwritable directory turns into
null fields or a logged warning, never an exception from `maybe_write`.

torch and pynvml are imported inside functions: the sidecar imports this module for the file
format only and must not pay for (or need) either.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

SCHEMA_VERSION = 1
# The trainer's figures a stats file may carry under "training" (all optional; the sidecar exports them).
# Ratios are 0..1; counts are cumulative over the run (restarts included, from the checkpoint).
TRAINING_FIELDS: dict[str, type] = {
    "total_steps": int,  # optimizer steps the run will train
    "loss": float,  # mean training loss over the last log interval
    "learning_rate": float,  # the language model's lr at the last step
    "grad_norm": float,  # global gradient norm before clipping at the last step
    "tokens_per_s": float,  # job-wide tokens per second over the last log interval
    "mfu": float,  # model FLOPs utilisation over the last log interval (0..1)
    "data_wait_ratio": float,  # share of the interval the slowest rank waited for data (0..1)
    "eta_s": float,  # seconds left at the last interval's speed
    "last_checkpoint_step": int,  # newest checkpoint this run saved or resumed from
    "bad_samples": int,  # samples left out at start + replaced under data.on_bad_sample (cumulative)
    "started": float,  # Unix time this rank's process started training (a change = a restart)
}
STATS_DIR_ENV = "JANUS_STATS_DIR"
STATS_FILE_PATTERN = re.compile(r"^rank-(0|[1-9][0-9]*)\.json$")

_log = logging.getLogger(__name__)
_WARN_REPEAT_SECONDS = 300.0


def stats_file_name(rank: int) -> str:
    return f"rank-{rank}.json"


@dataclass(frozen=True)
class GpuMemory:
    """Device memory of one GPU as NVML reports it (bytes)."""

    uuid: str | None
    used_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class TorchMemory:
    """What torch's caching allocator holds on this rank's device (bytes)."""

    allocated_bytes: int
    reserved_bytes: int
    peak_allocated_bytes: int


GpuMemoryReader = Callable[[], "GpuMemory | None"]


def visible_device_id(index: int, cuda_visible_devices: str | None) -> str:
    """The NVML identity of CUDA device `index`: a UUID (`GPU-...`/`MIG-...`) or a physical index.

    Only a fallback for when torch reports neither UUID nor PCI bus id of the device.
    """
    if cuda_visible_devices is None or not cuda_visible_devices.strip():
        return str(index)
    entries = [entry.strip() for entry in cuda_visible_devices.split(",") if entry.strip()]
    if index >= len(entries):
        raise ValueError(
            f"CUDA device {index} is not among CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}"
        )
    return entries[index]


class NvmlMemoryReader:
    """Reads one CUDA device's memory through NVML; returns None when NVML or the GPU is missing."""

    def __init__(self, cuda_index: int | None = None):
        self._cuda_index = cuda_index
        self._handle: Any = None
        self._uuid: str | None = None
        self._unavailable_reason: str | None = None

    def __call__(self) -> GpuMemory | None:
        if self._handle is None and self._unavailable_reason is None:
            self._open()
        if self._handle is None:
            return None
        import pynvml

        try:
            try:
                # v2 leaves out the driver's reserved memory, as nvidia-smi's memory.used does.
                info = pynvml.nvmlDeviceGetMemoryInfo(self._handle, version=pynvml.nvmlMemory_v2)
            except (pynvml.NVMLError, TypeError, AttributeError):  # old driver or old bindings
                info = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
        except pynvml.NVMLError as err:
            _warn_limited(f"nvml-read-{self._uuid}", "NVML could not read memory of %s: %s", self._uuid, err)
            return None
        return GpuMemory(uuid=self._uuid, used_bytes=int(info.used), total_bytes=int(info.total))

    @property
    def unavailable_reason(self) -> str | None:
        return self._unavailable_reason

    def _open(self) -> None:
        try:
            import torch

            if not torch.cuda.is_available():
                self._unavailable_reason = "torch sees no CUDA device"
                return
            index = torch.cuda.current_device() if self._cuda_index is None else self._cuda_index
            properties = torch.cuda.get_device_properties(index)
        except Exception as err:  # a broken CUDA setup must not stop training
            self._unavailable_reason = f"torch could not describe the CUDA device: {err}"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as err:  # ImportError or NVMLError (no driver, no library)
            self._unavailable_reason = f"NVML is not available: {err}"
            _log.warning("GPU stats without NVML figures: %s", self._unavailable_reason)
            return
        handle = _nvml_handle_for(pynvml, index, properties)
        if handle is None:
            self._unavailable_reason = f"NVML does not know CUDA device {index}"
            _log.warning("GPU stats without NVML figures: %s", self._unavailable_reason)
            return
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        self._uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        self._handle = handle


def _nvml_handle_for(pynvml: Any, index: int, properties: Any) -> Any:
    """The NVML handle of CUDA device `index`: by UUID, else PCI bus id, else CUDA_VISIBLE_DEVICES."""
    torch_uuid = str(getattr(properties, "uuid", "") or "")
    if torch_uuid:
        candidates = [torch_uuid] if torch_uuid.startswith(("GPU-", "MIG-")) else [
            f"GPU-{torch_uuid}",
            f"MIG-{torch_uuid}",
        ]
        for candidate in candidates:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(candidate)
            except pynvml.NVMLError:
                pass
    bus = getattr(properties, "pci_bus_id", None)
    if bus is not None:
        domain = getattr(properties, "pci_domain_id", 0) or 0
        device = getattr(properties, "pci_device_id", 0) or 0
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08X}:{bus:02X}:{device:02X}.0")
        except pynvml.NVMLError:
            pass
    try:
        identity = visible_device_id(index, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if identity.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(identity))
        return pynvml.nvmlDeviceGetHandleByUUID(identity)
    except (ValueError, pynvml.NVMLError):
        return None


def torch_memory(device: int | None = None) -> TorchMemory | None:
    """The caching allocator's figures on `device` (default: the current one); None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        index = torch.cuda.current_device() if device is None else device
        return TorchMemory(
            allocated_bytes=int(torch.cuda.memory_allocated(index)),
            reserved_bytes=int(torch.cuda.memory_reserved(index)),
            peak_allocated_bytes=int(torch.cuda.max_memory_allocated(index)),
        )
    except Exception as err:
        _warn_limited("torch-memory", "torch could not report CUDA memory: %s", err)
        return None


def peak_memory_bytes(device: int | None = None) -> int:
    """This rank's peak torch-allocated bytes on its GPU (since start or the last reset); 0 on CPU."""
    memory = torch_memory(device)
    return 0 if memory is None else memory.peak_allocated_bytes


@dataclass(frozen=True)
class MemoryExtremes:
    min_bytes: int
    max_bytes: int


def gather_memory_extremes(local_bytes: int) -> MemoryExtremes:
    """Job-wide min and max of `local_bytes` over all ranks.

    A collective when torch.distributed is initialised: every rank must call it at the same point.
    Otherwise (a single process) both extremes are the local value.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return MemoryExtremes(min_bytes=int(local_bytes), max_bytes=int(local_bytes))
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    # One MAX reduction gives both: max(x) and max(-x) = -min(x).
    values = torch.tensor([int(local_bytes), -int(local_bytes)], dtype=torch.int64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return MemoryExtremes(min_bytes=int(-values[1].item()), max_bytes=int(values[0].item()))


class RankStatsWriter:
    """Writes this rank's stats file at most once per `interval_seconds`.

    `gpu_memory_reader` replaces the NVML reading of this rank's GPU (for a device NVML does not
    see, or to report figures from another source); by default NVML reads the current CUDA device.
    """

    def __init__(
        self,
        stats_dir: str | os.PathLike[str],
        rank: int,
        local_rank: int,
        node: str,
        interval_seconds: float,
        *,
        gpu_memory_reader: GpuMemoryReader | None = None,
        cuda_device: int | None = None,
    ):
        if interval_seconds < 0:
            raise ValueError(f"interval_seconds must be >= 0, got {interval_seconds}")
        self.stats_dir = Path(stats_dir)
        self.rank = int(rank)
        self.local_rank = int(local_rank)
        self.node = str(node)
        self.interval_seconds = float(interval_seconds)
        self.path = self.stats_dir / stats_file_name(self.rank)
        self._cuda_device = cuda_device
        self._read_gpu = gpu_memory_reader or NvmlMemoryReader(cuda_device)
        self._last_write: float | None = None

    @classmethod
    def from_env(cls, interval_seconds: float, **kwargs: Any) -> "RankStatsWriter | None":
        """A writer configured from JANUS_STATS_DIR, RANK, LOCAL_RANK and NODE_NAME; None if the
        stats directory is not set (stats are off)."""
        stats_dir = os.environ.get(STATS_DIR_ENV)
        if not stats_dir:
            return None
        node = os.environ.get("NODE_NAME") or socket.gethostname()
        return cls(
            stats_dir,
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            node=node,
            interval_seconds=interval_seconds,
            **kwargs,
        )

    def maybe_write(self, step: int, step_time_s: float | None, samples_per_s: float | None,
                    training: Mapping[str, float | int | None] | None = None) -> bool:
        """Writes the stats file if the interval has passed since the last write; True if written."""
        now = time.monotonic()
        if self._last_write is not None and now - self._last_write < self.interval_seconds:
            return False
        self._last_write = now
        return self.write(step, step_time_s, samples_per_s, training)

    def write(self, step: int, step_time_s: float | None, samples_per_s: float | None,
              training: Mapping[str, float | int | None] | None = None) -> bool:
        """Writes the stats file now; False (with a warning) if it could not be written.

        `training` holds the trainer's latest step figures (`TRAINING_FIELDS`); unknown names are
        dropped, non-finite values become null."""
        try:
            record = self.snapshot(step, step_time_s, samples_per_s, training)
            self._replace(json.dumps(record, allow_nan=False, separators=(",", ":")))
            return True
        except Exception as err:  # stats must never stop training
            _warn_limited(f"write-{self.path}", "could not write GPU stats file %s: %s", self.path, err)
            return False

    def snapshot(self, step: int, step_time_s: float | None, samples_per_s: float | None,
                 training: Mapping[str, float | int | None] | None = None) -> dict[str, Any]:
        """The record the stats file holds, as a dict (schema `SCHEMA_VERSION`)."""
        try:
            gpu = self._read_gpu()
        except Exception as err:
            _warn_limited(f"gpu-read-{self.rank}", "reading GPU memory failed: %s", err)
            gpu = None
        allocator = torch_memory(self._cuda_device)
        return {
            "schema": SCHEMA_VERSION,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "node": self.node,
            "pid": os.getpid(),
            "gpu_available": gpu is not None,
            "gpu_uuid": gpu.uuid if gpu else None,
            "gpu_memory_used_bytes": gpu.used_bytes if gpu else None,
            "gpu_memory_total_bytes": gpu.total_bytes if gpu else None,
            "torch_allocated_bytes": allocator.allocated_bytes if allocator else None,
            "torch_reserved_bytes": allocator.reserved_bytes if allocator else None,
            "torch_peak_allocated_bytes": allocator.peak_allocated_bytes if allocator else None,
            "step": int(step),
            "step_time_s": _finite_or_none(step_time_s),
            "samples_per_s": _finite_or_none(samples_per_s),
            "timestamp": time.time(),
            "training": training_record(training or {}),
        }

    def _replace(self, text: str) -> None:
        self.stats_dir.mkdir(parents=True, exist_ok=True)
        temp = self.stats_dir / f".{self.path.name}.{os.getpid()}.tmp"
        try:
            with open(temp, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(temp, self.path)
        finally:
            if temp.exists():
                temp.unlink()


def training_record(values: Mapping[str, float | int | None]) -> dict[str, float | int | None]:
    """The `training` object of a stats file: each of `TRAINING_FIELDS`, finite or null."""
    record: dict[str, float | int | None] = {}
    for name, kind in TRAINING_FIELDS.items():
        value = _finite_or_none(values.get(name))
        record[name] = None if value is None else (int(value) if kind is int else value)
    return record


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


_last_warned: dict[str, float] = {}


def _warn_limited(key: str, message: str, *args: Any) -> None:
    now = time.monotonic()
    last = _last_warned.get(key)
    if last is None or now - last >= _WARN_REPEAT_SECONDS:
        _last_warned[key] = now
        _log.warning(message, *args)

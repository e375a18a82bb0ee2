"""Helpers the benches share: the card's name, where results go, atomic JSON, a plain table."""

from __future__ import annotations

import datetime
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
GIB = 1024**3

# Dense bf16 tensor-core peak of an H100 SXM (data sheet) and the bf16 matmul rate measured on
# one H100 of the device (bench/llm_probe.py's machine); MFU is reported against both.
H100_DENSE_BF16_FLOPS = 989e12
H100_MEASURED_MATMUL_FLOPS = 790e12


def card_name() -> str:
    """torch.cuda.get_device_name of GPU 0, or "cpu"."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def card_slug(card: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3" (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown"


def results_path(card: str, gpus: int, out: str | None = None, prefix: str = "", tag: str = "") -> Path:
    """`<out or $OUT or bench/results>/<prefix><date>-<card>-<gpus>[-<tag>].json`."""
    folder = Path(out or os.environ.get("OUT") or RESULTS_DIR)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    suffix = f"-{card_slug(tag)}" if tag else ""
    return folder / f"{prefix}{date}-{card_slug(card)}-{gpus}{suffix}.json"


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Writes to a temporary name in the same folder, then renames: never half a file. The name is the
    writing thread's own (a heartbeat thread and the main thread may write the same file at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], title: str = "") -> str:
    """Prints (and returns) a fixed-width table; columns are (key, header)."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([fmt(row.get(key)) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [title] if title else []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(r, widths)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def scrape_metrics(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The sidecar's /metrics on this host, parsed with Prometheus' own parser: name -> [(labels, value)]."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        if response.status != 200:
            raise RuntimeError(f"/metrics on port {port} answered HTTP {response.status}")
        text = response.read().decode()
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return series


def kill_tree(pid: int) -> list[int]:
    """SIGKILLs `pid` and every process below it; returns the pids killed.

    torchrun starts each rank in a session of its own, so killing torchrun's process group would
    leave hung ranks (and their DataLoader workers) holding the GPUs. The tree is listed first,
    then every process in it is killed (the root first, so nothing restarts the ranks). The caller
    still reaps `pid` itself (Popen.wait).
    """
    import signal

    import psutil

    try:
        root = psutil.Process(pid)
        below = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    killed = []
    for proc in [root] + below:
        try:
            proc.send_signal(signal.SIGKILL)
            killed.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(below, timeout=10)
    return killed


def default_job_spec(name: str, world_size: int, *, tiny: bool = False, overrides: tuple = (),
                     checkpoint_url: str = "/ckpt"):
    """A minimal valid job spec on one node of `world_size` GPUs, every other field at its default
    (the configuration janus-train ships), plus `overrides` ((dotted path, value) pairs).

    The shipped unit is an 8-GPU node: below it, for --tiny, and for overrides that include
    ("unchecked_fit", True), the spec is validated at 8 GPUs (where the memory-fit check, an upper
    bound for max_pixels images, runs) and then moved to `world_size`.
    """
    from janus_job.config.load import validate_spec

    unchecked = tiny or world_size < 8 or ("unchecked_fit", True) in overrides
    data = {
        "name": name,
        "model": {"qwen": "/models/qwen", "vggt": "/models/vggt"},
        "data": {"annotations": "/data/annotations.json", "image_root": "/data"},
        "features": {"store": "/features"},
        "training": {"nodes": 1, "gpus_per_node": 8 if unchecked else world_size,
                     "checkpoint": {"url": checkpoint_url}},
    }
    for path, value in overrides:
        if path == "unchecked_fit":
            continue
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    spec = validate_spec(data, f"bench {name} spec")
    if unchecked:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"gpus_per_node": world_size})})
    return spec


# ---------------------------------------------------------------- progress, not wall time


def load_factor() -> float:
    """How much slower than idle this machine may run now: the 1-minute load per core, at least 1."""
    try:
        return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:
        return 1.0


class Heartbeat:
    """A process's sign of life for a parent's watchdog, judged by progress instead of a wall budget.

    A daemon thread looks at where the main thread is every `interval_s` and rewrites `path`
    (atomically) with the current phase and `moved`: the last time the main thread was seen
    somewhere else than before. A process that computes moves, however loaded the machine; one
    that waits in a collective or sleeps does not. After `dump_after_s` without a move the
    thread writes every thread's Python stack to `stacks` (once per still period), so the
    evidence exists before the parent kills the process.
    """

    def __init__(self, path: str | Path, *, interval_s: float = 0.5, stacks: Any = None,
                 dump_after_s: float | None = None) -> None:
        import threading

        self.path = Path(path)
        self.interval_s = interval_s
        self.stacks = stacks
        self.dump_after_s = dump_after_s
        self._state = {"phase": "start", "step": -1, "micro": -1}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._moved = self._changed = time.time()
        self._where = self._main_position()
        self._write()
        self._thread.start()
        return self

    def __call__(self, phase: str, step: int = -1, micro: int = -1) -> None:
        """Enters a phase (a move in itself)."""
        with self._lock:
            self._state = {"phase": phase, "step": step, "micro": micro}
            self._moved = self._changed = time.time()
        self._write()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _main_position(self) -> tuple:
        import sys

        frame = sys._current_frames().get(self._main)
        where = []
        while frame is not None and len(where) < 64:
            where.append((id(frame), frame.f_lasti))  # a new call is a new frame object
            frame = frame.f_back
        return tuple(where)

    def _write(self) -> None:
        with self._lock:
            record = dict(self._state, time=self._changed, moved=self._moved)
        write_json_atomic(self.path, record)

    def _run(self) -> None:
        import faulthandler

        dumped = False
        while not self._stop.wait(self.interval_s):
            where = self._main_position()
            now = time.time()
            if where != self._where:
                self._where, dumped = where, False
                with self._lock:
                    self._moved = now
            elif (not dumped and self.stacks is not None and self.dump_after_s is not None
                  and now - self._moved > self.dump_after_s):
                self.stacks.write(f"no progress for {now - self._moved:.0f} s in phase {self._state['phase']} "
                                  f"(step {self._state['step']} micro {self._state['micro']}); stacks:\n")
                self.stacks.flush()
                faulthandler.dump_traceback(file=self.stacks, all_threads=True)
                self.stacks.flush()
                dumped = True
            self._write()


def still_for(record: dict | None, now: float) -> float:
    """Seconds a Heartbeat record's process has not moved (0 for no record yet)."""
    return now - record["moved"] if record else 0.0

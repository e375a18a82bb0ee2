"""Helpers the benches share: the card's name, where results go, atomic JSON, a plain table."""

from __future__ import annotations

import datetime
import json
import os
import re
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
    """Writes to a temporary name in the same folder, then renames: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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

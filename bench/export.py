"""The product export of the full-size model, measured: `janus-job export` of a real DeepSpeed checkpoint.

    python3 bench/export.py                         # GPU: Qwen2.5-VL-7B + VGGT-1B shapes, random weights
    python3 bench/export.py --tiny --out DIR        # CPU: the tiny flavor, same steps (CI)

One process, world size 1, nothing downloaded:

1. inputs, synthesised in --workdir: the base Qwen directory (config.json of models/flavors.py's 7B
   architecture; the frozen tensors, i.e. the vision tower without its merger, in Qwen's published key
   layout: the only tensors the exporter reads from model.qwen; tokenizer, processor and generation
   files as small stand-ins, copied byte for byte by the export as the real ones would be), a VGGT
   checkpoint (a random VGGT-1B-sized aggregator, fp32, describing its architecture) and the job spec;
2. JanusVLN with random bf16 weights initialised directly on the GPU, the product's DeepSpeed engine
   (`build_engine`: the spec's defaults, ZeRO-1, torch AdamW) and a checkpoint written by
   `CheckpointManager` (rank files to staging, then to the checkpoint URL, COMPLETE). No optimizer
   step is taken, so the Adam moments are not allocated and the optimizer files hold the fp32 master
   partitions only; the exporter reads nothing else of them. Files the exporter reads: the rank-0
   `*model_states.pt` (parameter names and shapes; the bf16 module weights in it are memory-mapped,
   not read), every `*optim_states.pt` (the fp32 master weights, read in full), the frozen tensors
   of model.qwen, the `aggregator.*` tensors of model.vggt; it copies the base directory's
   tokenizer/processor/generation files;
3. the inputs are flushed and dropped from the page cache (fsync + posix_fadvise DONTNEED), then
   `python -m janus_job.cli export SPEC --out DIR` runs as a child process: wall time, its peak RSS
   (`os.wait4`'s ru_maxrss, the same figure as getrusage(RUSAGE_CHILDREN) for that child) and, sampled
   every 20 ms from /proc, the peaks of its anonymous and file-backed resident memory (the rank files
   are memory-mapped: their pages count in RSS but are page cache the kernel can reclaim);
4. exported tensors are compared with their sources (a trained LLM weight, the spatial merger, a frozen
   vision weight, a VGGT weight): equal in bf16, or the run fails.

Prints a summary and writes JSON to `$OUT` or `bench/results/export-<date>-<card>-1[-tiny].json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import common  # noqa: E402  (bench/common.py)

GIB = 1024**3
# tensors compared between the export and their sources (our parameter names; janusvln_key maps them)
SPOT_TRAINED = ("model.language_model.layers.0.self_attn.q_proj.weight", "merger.mlp.0.weight")
SPOT_FROZEN = "model.visual.blocks.0.attn.qkv.weight"
SPOT_VGGT = "frame_blocks.0.attn.qkv.weight"


def job_spec_data(workdir: Path, tiny: bool) -> dict:
    """The job spec the export CLI reads (the engine's spec is the same, moved to one GPU)."""
    data = {
        "name": "bench-export",
        "model": {"qwen": str(workdir / "qwen"), "vggt": str(workdir / "vggt.safetensors")},
        "data": {"annotations": str(workdir / "annotations.json"), "image_root": str(workdir)},
        "features": {"store": str(workdir / "store")},
        "training": {"nodes": 1, "gpus_per_node": 8, "checkpoint": {"url": str(workdir / "checkpoints")}},
        "deepspeed": {"bf16": not tiny},
    }
    if tiny:  # the fit check estimates the 7B model; the tiny one fits anywhere
        data["cluster"] = {"resources": {"gpu_memory_gib": 100_000}}
    return data


def write_base_dir(path: Path, model, qwen_config) -> int:
    """config.json, the frozen tensors (published layout) and stand-in tokenizer/processor files."""
    from safetensors.torch import save_file

    from janus_job.demo.tiny import tiny_image_processor, tiny_tokenizer
    from janus_job.models.janusvln.export import janusvln_key

    path.mkdir(parents=True)
    qwen_config.save_pretrained(path)
    frozen = {janusvln_key(name): p.detach().to("cpu", copy=True).contiguous()
              for name, p in model.named_parameters() if not p.requires_grad}
    save_file(frozen, path / "model.safetensors", metadata={"format": "pt"})
    tiny_tokenizer().save_pretrained(path)
    tiny_image_processor().save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False, "repetition_penalty": 1.05}))
    return sum(t.numel() * t.element_size() for t in frozen.values())


def drop_from_page_cache(paths: list[Path]) -> int:
    """fsync + POSIX_FADV_DONTNEED on every file under `paths`; returns the bytes covered."""
    total = 0
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            total += f.stat().st_size
    return total


class ProcMemory:
    """Peaks of a child's VmRSS / RssAnon / RssFile / RssShmem (KiB in /proc/<pid>/status), sampled."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, pid: int, interval_s: float = 0.02):
        self.pid, self.interval_s = pid, interval_s
        self.peaks = dict.fromkeys(self.FIELDS, 0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        key, _, value = line.partition(":")
                        if key in self.peaks:
                            self.peaks[key] = max(self.peaks[key], int(value.split()[0]))
                self.samples += 1
            except (OSError, ValueError, IndexError):
                pass
            self._stop.wait(self.interval_s)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {f"{k.lower()}_peak_gib": (v / 1024**2 if self.samples else None) for k, v in self.peaks.items()}


def run_export(spec_path: Path, out_dir: Path, log_path: Path) -> dict:
    """`janus-job export` as a child process: wall time, exit code, ru_maxrss, sampled memory peaks."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "janus_job.cli", "export", str(spec_path), "--out", str(out_dir)]
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        memory = ProcMemory(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"command": " ".join(cmd[1:]), "exit_code": proc.returncode, "wall_s": wall,
            "ru_maxrss_gib": usage.ru_maxrss / 1024**2,  # KiB on Linux
            "user_cpu_s": usage.ru_utime, "system_cpu_s": usage.ru_stime, **memory.stop()}


def dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def bench(args) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist
    import yaml

    from janus_job.config.deepspeed import render_deepspeed_config
    from janus_job.config.load import validate_spec
    from janus_job.models.flavors import qwen25_vl_7b_config, vggt_config
    from janus_job.models.janusvln.build import model_from_config
    from janus_job.models.vggt import FrameCausalAggregator, save_aggregator
    from janus_job.train.checkpoint import CheckpointManager
    from janus_job.train.distributed import skip_cpu_shm_collectives
    from janus_job.train.engine import build_engine
    from janus_job.train.shutdown import release_distributed

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("bench/export.py: no GPU; the full-size run initialises the model on the GPU (or use --tiny)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise SystemExit(f"bench/export.py: --workdir {workdir} is not empty")
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if not cuda:
        skip_cpu_shm_collectives()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    data = job_spec_data(workdir, args.tiny)
    spec_path = workdir / "job.yaml"
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = validate_spec(data, "bench export spec")
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"gpus_per_node": 1})})
    config = render_deepspeed_config(spec, 1)
    if args.tiny:
        from janus_job.demo.tiny import tiny_qwen_config

        qwen_config, vggt = tiny_qwen_config(), vggt_config("tiny")
        config["bf16"] = {"enabled": False}
    else:
        qwen_config, vggt = qwen25_vl_7b_config(), vggt_config("vggt-1b")
    dtype = torch.bfloat16 if config["bf16"]["enabled"] else torch.float32
    phases: dict[str, float] = {}

    t0 = time.perf_counter()
    model = model_from_config(qwen_config, dtype=dtype, device=device, spatial_channels=2 * int(vggt.embed_dim))
    with torch.device(device):
        aggregator = FrameCausalAggregator(vggt)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    vggt_numel = sum(p.numel() for p in aggregator.parameters())
    if cuda:
        torch.cuda.synchronize()
    phases["init_on_device_s"] = time.perf_counter() - t0

    # disk: checkpoint (bf16 module + fp32 master) + base + vggt + export, and staging beside it
    width = dtype.itemsize
    need = {"checkpoint": trainable * (width + 4), "base": frozen * width, "vggt": vggt_numel * 4,
            "export": (trainable + frozen + vggt_numel) * width}
    staging = Path(args.staging) if args.staging else _default_staging(workdir, need["checkpoint"], args.tiny)
    if staging.parent == Path("/dev/shm") and args.staging is None:
        args.made_staging = staging
    out_dir = Path(args.export_dir) if args.export_dir else workdir / "export"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"bench/export.py: --export-dir {out_dir} is not empty")
    same_fs = _device_of(staging) == _device_of(workdir)
    on_workdir = sum(need.values()) + (trainable * 4 if same_fs else 0)  # + the largest file staged
    if _device_of(out_dir.parent) != _device_of(workdir):
        on_workdir -= need["export"]
    free = shutil.disk_usage(workdir).free
    if free < 1.05 * on_workdir:
        raise SystemExit(f"bench/export.py: {workdir} has {free / GIB:.1f} GiB free, the run needs about "
                         f"{on_workdir / GIB:.1f} GiB there (checkpoint {need['checkpoint'] / GIB:.1f}, export "
                         f"{need['export'] / GIB:.1f}); give --workdir on a larger disk or --staging elsewhere")

    t0 = time.perf_counter()
    base_bytes = write_base_dir(workdir / "qwen", model, qwen_config)
    save_aggregator(aggregator, workdir / "vggt.safetensors")
    spots = {"vggt": {SPOT_VGGT: aggregator.state_dict()[SPOT_VGGT].detach().to("cpu", copy=True)}}
    del aggregator
    phases["write_inputs_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    engine, config = build_engine(spec, model, 1, total_steps=1, config=config)
    if cuda:
        torch.cuda.synchronize()
    phases["build_engine_s"] = time.perf_counter() - t0
    params = dict(engine.module.named_parameters())
    spots["model"] = {name: params[name].detach().to("cpu", copy=True) for name in (*SPOT_TRAINED, SPOT_FROZEN)}

    manager = CheckpointManager(str(workdir / "checkpoints"), keep=1, interval_steps=1, rank=0, world_size=1,
                                local_rank=0, staging_dir=staging)
    t0 = time.perf_counter()
    manager.save(engine, 1, {"step": 1, "note": "bench/export.py"})
    manager.wait()
    phases["checkpoint_save_s"] = time.perf_counter() - t0
    save_stats = dict(manager.last_save_stats)
    ref = manager.latest()
    if ref is None or ref.step != 1:
        raise SystemExit("bench/export.py: the checkpoint did not complete")
    peak_gpu = torch.cuda.max_memory_allocated() / GIB if cuda else None
    del engine, model, params
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    dropped = drop_from_page_cache([workdir / "checkpoints", workdir / "qwen", workdir / "vggt.safetensors"])
    phases["flush_and_drop_cache_s"] = time.perf_counter() - t0

    log_path = workdir / "export.log"
    export = run_export(spec_path, out_dir, log_path)
    log_text = log_path.read_text()
    if export["exit_code"] != 0:
        print(log_text[-6000:], file=sys.stderr)
        raise SystemExit(f"bench/export.py: janus-job export exited {export['exit_code']}")
    output = dir_bytes(out_dir)
    export.update(output_bytes=sum(output.values()), output_files=output, export_dir=str(out_dir),
                  log=[line for line in log_text.splitlines() if line.startswith("export ")])
    export["gib_per_s_written"] = export["output_bytes"] / GIB / export["wall_s"]
    checks = spot_check(out_dir, spots)

    result = {
        "card": common.card_name() if cuda else "cpu",
        "gpus": 1,
        "tiny": args.tiny,
        "model": "tiny" if args.tiny else "Qwen2.5-VL-7B + VGGT-1B aggregator (random weights)",
        "zero_stage": config["zero_optimization"]["stage"],
        "bf16": config["bf16"]["enabled"],
        "trainable_params": trainable,
        "frozen_params": frozen,
        "vggt_aggregator_params": vggt_numel,
        "cpu_count": os.cpu_count(),
        "phases": phases,
        "peak_gpu_allocated_gib": peak_gpu,
        "checkpoint": {"files": dict(ref.manifest["files"]), "total_bytes": ref.manifest["total_bytes"],
                       "save": save_stats, "staging": str(staging), "optimizer_step_taken": False},
        "inputs": {"base_frozen_tensor_bytes": base_bytes,
                   "vggt_bytes": (workdir / "vggt.safetensors").stat().st_size,
                   "dropped_from_page_cache_bytes": dropped},
        "export": export,
        "spot_checks": checks,
        "exporter_reads": "rank-0 *model_states.pt (names/shapes), every *optim_states.pt (fp32 master), "
                          "model.qwen's frozen tensors, model.vggt's aggregator.* tensors; copies the base "
                          "tokenizer/processor/generation files",
    }
    release_distributed()
    if not all(checks.values()):
        raise SystemExit(f"bench/export.py: exported tensors differ from their sources: {checks}")
    return result


def spot_check(out_dir: Path, spots: dict) -> dict[str, bool]:
    """Exported tensors equal their sources after the export's cast."""
    import torch
    from safetensors import safe_open

    from janus_job.models.janusvln.export import janusvln_key

    index = json.loads((out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = {janusvln_key(n): t for n, t in spots["model"].items()}
    wanted.update({"vggt.aggregator." + n: t for n, t in spots["vggt"].items()})
    checks = {}
    for key, source in wanted.items():
        if key not in index:
            checks[key] = False
            continue
        with safe_open(str(out_dir / index[key]), framework="pt") as f:
            stored = f.get_tensor(key)
        checks[key] = bool(stored.shape == source.shape and torch.equal(stored, source.to(stored.dtype)))
    return checks


def _default_staging(workdir: Path, checkpoint_bytes: int, tiny: bool) -> Path:
    """/dev/shm when it holds the staged checkpoint (the export never reads staging), else the workdir."""
    shm = Path("/dev/shm")
    if not tiny and shm.is_dir() and shutil.disk_usage(shm).free > 1.1 * checkpoint_bytes:
        return Path(tempfile.mkdtemp(prefix="janus-export-staging-", dir=shm))
    return workdir / "staging"


def _device_of(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return path.stat().st_dev


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, gloo, the tiny flavor (CI)")
    p.add_argument("--workdir", default=None, help="empty folder for every file of the run (default: a new "
                   "temporary folder, removed at the end); about 70 GiB at full size")
    p.add_argument("--staging", default=None, help="checkpoint staging (default: /dev/shm when it has room, "
                   "else in the workdir)")
    p.add_argument("--export-dir", default=None, help="where the export is written (default: <workdir>/export); "
                   "another disk or /dev/shm when the workdir cannot hold both")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--out", default=None, help="result folder (default $OUT or bench/results)")
    args = p.parse_args(argv)
    made = args.workdir is None
    args.made_staging = None
    if made:
        args.workdir = tempfile.mkdtemp(prefix="janus-export-bench-")
    try:
        result = bench(args)
    finally:
        if made and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
        if args.made_staging is not None:
            shutil.rmtree(args.made_staging, ignore_errors=True)
    e = result["export"]
    common.print_table([{
        "ckpt_gib": result["checkpoint"]["total_bytes"] / GIB, "out_gib": e["output_bytes"] / GIB,
        "wall_s": e["wall_s"], "maxrss": e["ru_maxrss_gib"], "anon": e["rssanon_peak_gib"],
        "file": e["rssfile_peak_gib"], "save_s": result["phases"]["checkpoint_save_s"],
    }], [("ckpt_gib", "ckpt GiB"), ("out_gib", "export GiB"), ("wall_s", "export s"), ("maxrss", "peak RSS GiB"),
         ("anon", "anon GiB"), ("file", "file-backed GiB"), ("save_s", "ckpt save s")],
        title=f"janus-job export - {result['card']} ({result['model']}, ZeRO-{result['zero_stage']}, "
              f"{result['trainable_params'] / 1e9:.2f}B trainable)")
    path = common.results_path(result["card"], 1, args.out, prefix="export-", tag="tiny" if args.tiny else "")
    common.write_json_atomic(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

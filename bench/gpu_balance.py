"""GPU-balance benchmark: per-rank stats + the real sidecar, checked against nvidia-smi.

One process per GPU writes its stats with `RankStatsWriter`; rank `--heavy-rank` allocates
`--extra-gib` more than the others. The sidecar runs as its own process (`python -m
janus-job monitor`) on the stats directory. The bench then checks:

- `/metrics` answers before any rank has written, with janus_monitor_ranks_reporting 0;
- every GPU's janus_gpu_memory_used_bytes / _total_bytes agree with
  `nvidia-smi --query-gpu=uuid,memory.used,memory.total` within 1%;
- the heavy rank's GPU is the fullest (each rank reads its own GPU);
- the sidecar logs the imbalance WARN, and exits 0 on SIGTERM.

Run on a machine with 2+ GPUs:   python3 bench/gpu_balance.py
CPU smoke mode (CI):             python3 bench/gpu_balance.py --tiny --out /tmp/somewhere
Without --out, JSON goes to $OUT if set, else bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
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
MIB = 1024**2
TOLERANCE = 0.01
TINY_TOTAL_BYTES = 1 * GIB


def _worker(rank: int, args: argparse.Namespace, stats_dir: str, ready, stop) -> None:
    import torch

    from janus_job.monitor.gpustats import GpuMemory, RankStatsWriter

    held = []
    gib = args.base_gib + (args.extra_gib if rank == args.heavy_rank else 0.0)
    if args.tiny:
        # A CPU stand-in for device memory: the bytes this rank really holds in tensors.
        held.append(torch.empty(int(gib * GIB), dtype=torch.uint8))

        def read_cpu_memory() -> GpuMemory:
            used = sum(t.numel() * t.element_size() for t in held)
            return GpuMemory(uuid=f"CPU-tiny-{rank}", used_bytes=used, total_bytes=TINY_TOTAL_BYTES)

        writer = RankStatsWriter(
            stats_dir, rank, rank, args.node, args.interval, gpu_memory_reader=read_cpu_memory
        )
        device = torch.device("cpu")
        torch_uuid = None
    else:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        held.append(torch.empty(int(gib * GIB), dtype=torch.uint8, device=device))
        writer = RankStatsWriter(stats_dir, rank, rank, args.node, args.interval)
        torch_uuid = str(torch.cuda.get_device_properties(rank).uuid)
    x = torch.randn(512, 512, device=device)
    for step in range(args.steps):
        start = time.perf_counter()
        x = torch.tanh(x @ x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - start
        writer.maybe_write(step, step_time, 8 / max(step_time, 1e-9))
    if device.type == "cuda":
        torch.cuda.synchronize()
    written = writer.write(args.steps, step_time, 8 / max(step_time, 1e-9))
    record = json.loads(writer.path.read_text()) if written else None
    ready.put({"rank": rank, "written": written, "torch_uuid": torch_uuid, "record": record})
    stop.wait(600)


def _start_sidecar(args: argparse.Namespace, stats_dir: str) -> tuple[subprocess.Popen, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "janus_job.cli", "monitor",
            "--stats-dir", stats_dir,
            "--port", "0",
            "--host", "127.0.0.1",
            "--interval", str(args.interval),
            "--warn-ratio", str(args.warn_ratio),
            "--stale-after", "300",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def pump() -> None:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return process, lines


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _nvidia_smi() -> dict[str, tuple[int, int]]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid,memory.used,memory.total", "--format=csv,noheader,nounits"],
        check=True, capture_output=True, text=True,
    ).stdout
    table = {}
    for line in out.strip().splitlines():
        uuid, used, total = (field.strip() for field in line.split(","))
        table[uuid] = (int(used) * MIB, int(total) * MIB)
    return table


def _relative_diff(measured: float, reference: float) -> float:
    return abs(measured - reference) / reference if reference else float(measured != reference)


def run(args: argparse.Namespace) -> dict:
    import torch
    import torch.multiprocessing as mp

    if args.tiny:
        world, card = args.gpus or 2, "cpu (tiny)"
    else:
        if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
            raise SystemExit("gpu_balance needs 2+ CUDA GPUs (or --tiny for the CPU smoke run)")
        world = args.gpus or torch.cuda.device_count()
        card = torch.cuda.get_device_name(0)
    if not 0 <= args.heavy_rank < world:
        raise SystemExit(f"--heavy-rank {args.heavy_rank} is not among the {world} ranks")

    result: dict = {
        "bench": "gpu_balance",
        "card": card,
        "mode": "tiny" if args.tiny else "gpu",
        "ranks": world,
        "base_gib": args.base_gib,
        "extra_gib": args.extra_gib,
        "heavy_rank": args.heavy_rank,
        "warn_ratio": args.warn_ratio,
        "tolerance": TOLERANCE,
    }
    with tempfile.TemporaryDirectory(prefix="janus-stats-") as stats_dir:
        sidecar, lines = _start_sidecar(args, stats_dir)
        ctx = mp.get_context("spawn")
        ready, stop = ctx.Queue(), ctx.Event()
        workers = []
        try:
            port = int(_wait_for(
                lambda: next((m.group(1) for l in lines if (m := re.search(r":(\d+)/metrics", l))), None),
                30, "the sidecar to listen",
            ))
            first = common.scrape_metrics(port)
            result["ranks_reporting_before_training"] = first["janus_monitor_ranks_reporting"][0][1]

            workers = [ctx.Process(target=_worker, args=(r, args, stats_dir, ready, stop)) for r in range(world)]
            for worker in workers:
                worker.start()
            reports = {}
            deadline = time.monotonic() + args.timeout
            while len(reports) < world:
                try:
                    report = ready.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError("workers did not report in time") from None
                reports[report["rank"]] = report
            if not all(r["written"] for r in reports.values()):
                raise RuntimeError(f"a rank could not write its stats: {reports}")

            def settled():
                series = common.scrape_metrics(port)
                reporting = series.get("janus_monitor_ranks_reporting", [({}, 0)])[0][1]
                used = series.get("janus_gpu_memory_used_bytes", [])
                return series if reporting == world and len(used) == world else None

            # Two scans after the last write, so the served figures are the final ones.
            time.sleep(2 * args.interval)
            metrics = _wait_for(settled, 10 * args.interval + 10, "all ranks in /metrics")
            smi = {} if args.tiny else _nvidia_smi()
            warn_line = _wait_for(
                lambda: next((l for l in lines if " WARN " in l and "exceeds warn-ratio" in l), None),
                5 * args.interval + 5, "the imbalance WARN",
            )
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
            sidecar.send_signal(signal.SIGTERM)
            try:
                result["sidecar_exit_code"] = sidecar.wait(timeout=15)
            except subprocess.TimeoutExpired:
                sidecar.kill()
                result["sidecar_exit_code"] = None
        result["sidecar_log_tail"] = lines[-12:]

    totals = {labels["rank"]: value for labels, value in metrics["janus_gpu_memory_total_bytes"]}
    rows = []
    for labels, used in sorted(metrics["janus_gpu_memory_used_bytes"], key=lambda s: int(s[0]["rank"])):
        rank, uuid = int(labels["rank"]), labels["gpu"]
        row = {"rank": rank, "gpu": uuid, "used_bytes": used, "total_bytes": totals[labels["rank"]]}
        torch_uuid = reports[rank]["torch_uuid"]
        row["uuid_matches_torch_device"] = None if torch_uuid is None else uuid.endswith(torch_uuid)
        if smi:
            smi_used, smi_total = smi[uuid]
            row.update(
                smi_used_bytes=smi_used,
                smi_total_bytes=smi_total,
                used_rel_diff=_relative_diff(used, smi_used),
                total_rel_diff=_relative_diff(row["total_bytes"], smi_total),
            )
        rows.append(row)
    result["rows"] = rows
    imbalance = metrics["janus_gpu_memory_imbalance_ratio"][0][1]
    result["imbalance_ratio"] = imbalance
    result["warn_line"] = warn_line
    fullest = max(rows, key=lambda r: r["used_bytes"])["rank"]
    checks = {
        "metrics_before_training": result["ranks_reporting_before_training"] == 0,
        "heavy_rank_is_fullest": fullest == args.heavy_rank,
        "imbalance_flagged": imbalance > args.warn_ratio and warn_line is not None,
        "sidecar_clean_exit": result["sidecar_exit_code"] == 0,
    }
    if not args.tiny:
        peak_series = metrics.get("janus_torch_memory_peak_allocated_bytes", [])
        peaks = {labels["rank"]: value for labels, value in peak_series}
        result["torch_peak_allocated_bytes"] = peaks
        held = {r: args.base_gib + (args.extra_gib if r == args.heavy_rank else 0) for r in range(world)}
        checks["torch_peak_reported"] = all(peaks.get(str(r), 0) >= held[r] * GIB for r in range(world))
    if smi:
        checks["nvml_matches_nvidia_smi"] = all(
            r["used_rel_diff"] <= TOLERANCE and r["total_rel_diff"] <= TOLERANCE for r in rows
        )
        checks["uuid_is_own_device"] = all(r["uuid_matches_torch_device"] for r in rows)
    result["checks"] = checks
    result["passed"] = all(checks.values())
    return result


def _print_table(result: dict) -> None:
    print(f"gpu_balance on {result['card']} ({result['ranks']} ranks, heavy rank {result['heavy_rank']})")
    header = f"{'rank':>4}  {'gpu':<42} {'used GiB':>9} {'smi GiB':>9} {'diff %':>7} {'total GiB':>9}"
    print(header)
    for row in result["rows"]:
        smi = row.get("smi_used_bytes")
        smi_gib = "-" if smi is None else f"{smi / GIB:.3f}"
        diff = "-" if smi is None else f"{row['used_rel_diff'] * 100:.3f}"
        print(
            f"{row['rank']:>4}  {row['gpu']:<42} {row['used_bytes'] / GIB:>9.3f} "
            f"{smi_gib:>9} {diff:>7} {row['total_bytes'] / GIB:>9.2f}"
        )
    print(f"imbalance ratio {result['imbalance_ratio']:.3f} (warn at {result['warn_ratio']})")
    print(f"WARN line: {result['warn_line']}")
    for name, ok in result["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: no GPU, no nvidia-smi")
    parser.add_argument("--gpus", type=int, default=0, help="ranks to run (default: all GPUs; 2 in --tiny)")
    parser.add_argument("--base-gib", type=float, default=None, help="GiB every rank allocates")
    parser.add_argument("--extra-gib", type=float, default=None, help="GiB the heavy rank adds")
    parser.add_argument("--heavy-rank", type=int, default=1)
    parser.add_argument("--warn-ratio", type=float, default=0.2)
    parser.add_argument("--interval", type=float, default=None, help="seconds (writer and sidecar)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--node", default=os.environ.get("NODE_NAME", "bench-node"))
    parser.add_argument("--timeout", type=float, default=300, help="seconds for workers to get ready")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    args = parser.parse_args()
    if args.base_gib is None:
        args.base_gib = 0.1 if args.tiny else 4.0
    if args.extra_gib is None:
        args.extra_gib = 0.1 if args.tiny else 20.0
    if args.interval is None:
        args.interval = 0.5 if args.tiny else 1.0

    result = run(args)
    out_dir = args.out or Path(os.environ.get("OUT") or REPO_ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_balance_tiny.json" if args.tiny else "gpu_balance.json"
    (out_dir / name).write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result)
    print(f"wrote {out_dir / name}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

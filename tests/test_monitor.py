"""The GPU-balance sidecar, run as a real `janus-job monitor` process over files the real
RankStatsWriter wrote: log lines, WARNs, a real HTTP scrape, bad files, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import JANUS_JOB, load_scaled

from janus_job.monitor.gpustats import GpuMemory, RankStatsWriter
from janus_job.monitor.sidecar import RankStats, memory_spread, node_balances

GIB = 1024**3
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))

import common  # noqa: E402  (bench/common.py: the /metrics scrape the GPU bench uses too)

INTERVAL = 0.3
JOB = "job-a"


class Sidecar:
    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        match = self.wait_for_line(r"serving metrics on http://[^:]+:(\d+)/metrics")
        self.port = int(match.group(1))

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, pattern: str, timeout: float = 15, start: int = 0) -> re.Match:
        deadline = time.monotonic() + load_scaled(timeout)
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None and not self._pump.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; sidecar said:\n" + "\n".join(self.lines))

    def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        return common.scrape_metrics(self.port)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=10)
        self._pump.join(timeout=5)
        return code


@contextmanager
def sidecar(stats_dir: Path, *extra: str):
    process = subprocess.Popen(
        [
            *JANUS_JOB, "monitor",
            "--stats-dir", str(stats_dir),
            "--port", "0",
            "--host", "127.0.0.1",
            "--interval", str(INTERVAL),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "JANUS_JOB_NAME": JOB},
    )
    try:
        running = Sidecar(process)
        yield running
        assert running.stop() == 0, "\n".join(running.lines)
        assert running.lines[-1].endswith("monitor stopped")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def injected(uuid: str, used_gib: float, total_gib: float = 80):
    reading = GpuMemory(uuid=uuid, used_bytes=int(used_gib * GIB), total_bytes=int(total_gib * GIB))
    return lambda: reading


def by_rank(series, name) -> dict[str, tuple[dict[str, str], float]]:
    return {labels["rank"]: (labels, value) for labels, value in series.get(name, [])}


def test_metrics_answer_before_any_rank_writes(tmp_path):
    with sidecar(tmp_path / "not-yet-created") as running:
        series = running.scrape()
        assert series["janus_monitor_ranks_reporting"] == [({}, 0.0)]
        assert "janus_gpu_memory_used_bytes" not in series
        running.wait_for_line(r"INFO gpu-balance waiting: .*not-yet-created does not exist yet")


def test_unbalanced_node_is_logged_warned_and_scraped(tmp_path):
    writers = [
        RankStatsWriter(tmp_path, 0, 0, "node-a", 0, gpu_memory_reader=injected("GPU-aaa", 70)),
        RankStatsWriter(tmp_path, 1, 1, "node-a", 0, gpu_memory_reader=injected("GPU-bbb", 40)),
    ]
    for step, writer in enumerate(writers):
        assert writer.maybe_write(step=100 + step, step_time_s=0.5, samples_per_s=16.0 + step)
    with sidecar(tmp_path, "--warn-ratio", "0.25") as running:
        running.wait_for_line(
            r"INFO gpu-balance node=node-a used=\[70\.0, 40\.0\] GiB spread=42\.9% "
            r"min_headroom=10\.0 GiB ranks=2$"
        )
        running.wait_for_line(
            r"WARN gpu-balance node=node-a spread=42\.9% exceeds warn-ratio 25\.0%: "
            r"rank 0 uses 70\.0 GiB, rank 1 uses 40\.0 GiB"
        )
        series = running.scrape()
        used = by_rank(series, "janus_gpu_memory_used_bytes")
        assert used["0"] == ({"job": JOB, "node": "node-a", "gpu": "GPU-aaa", "rank": "0"}, 70 * GIB)
        assert used["1"] == ({"job": JOB, "node": "node-a", "gpu": "GPU-bbb", "rank": "1"}, 40 * GIB)
        total = by_rank(series, "janus_gpu_memory_total_bytes")
        assert {rank: value for rank, (_, value) in total.items()} == {"0": 80 * GIB, "1": 80 * GIB}
        assert series["janus_gpu_memory_imbalance_ratio"] == [
            ({"job": JOB, "scope": "node", "node": "node-a"}, pytest.approx(30 / 70))
        ]
        throughput = by_rank(series, "janus_train_samples_per_second")
        assert {rank: value for rank, (_, value) in throughput.items()} == {"0": 16.0, "1": 17.0}
        updated = by_rank(series, "janus_metrics_last_update_timestamp_seconds")
        for rank, writer in enumerate(writers):
            assert updated[str(rank)][1] == pytest.approx(json.loads(writer.path.read_text())["timestamp"])
        assert series["janus_monitor_ranks_reporting"] == [({}, 2.0)]
        # CPU ranks have no torch CUDA allocator: no peak series rather than a made-up zero.
        assert "janus_torch_memory_peak_allocated_bytes" not in series

        # The trainer rebalances: the next lines show it and the WARN stops.
        writers[1] = RankStatsWriter(tmp_path, 1, 1, "node-a", 0, gpu_memory_reader=injected("GPU-bbb", 69))
        writers[1].write(step=101, step_time_s=0.5, samples_per_s=17.0)
        mark = len(running.lines)
        running.wait_for_line(r"used=\[70\.0, 69\.0\] GiB spread=1\.4%", start=mark)
        later = len(running.lines)
        running.wait_for_line(r"used=\[70\.0, 69\.0\] GiB spread=1\.4%", start=later)
        assert not any("exceeds warn-ratio" in line for line in running.lines[later:])
        ratio = running.scrape()["janus_gpu_memory_imbalance_ratio"][0][1]
        assert ratio == pytest.approx(1 / 70)


def test_cpu_only_ranks_report_without_gpu_figures(tmp_path):
    for rank in range(2):
        RankStatsWriter(tmp_path, rank, rank, "cpu-node", 0).write(step=3, step_time_s=1.0, samples_per_s=2.5)
    with sidecar(tmp_path) as running:
        running.wait_for_line(
            r"INFO gpu-balance node=cpu-node used=\[n/a, n/a\] GiB spread=n/a min_headroom=n/a ranks=2$"
        )
        series = running.scrape()
        assert series["janus_monitor_ranks_reporting"] == [({}, 2.0)]
        assert "janus_gpu_memory_used_bytes" not in series
        assert "janus_gpu_memory_imbalance_ratio" not in series
        assert {l["rank"] for l, _ in series["janus_train_samples_per_second"]} == {"0", "1"}
    assert not any(" WARN " in line for line in running.lines)


def test_stale_rank_is_warned_and_counted(tmp_path):
    fresh = RankStatsWriter(tmp_path, 0, 0, "node-a", 0, gpu_memory_reader=injected("GPU-aaa", 50))
    hung = RankStatsWriter(tmp_path, 1, 1, "node-a", 0, gpu_memory_reader=injected("GPU-bbb", 50))
    fresh.write(1, 0.1, 1.0)
    hung.write(1, 0.1, 1.0)
    stop = threading.Event()

    def keep_writing():
        while not stop.wait(0.1):
            fresh.write(2, 0.1, 1.0)

    thread = threading.Thread(target=keep_writing)
    thread.start()
    try:
        with sidecar(tmp_path, "--stale-after", "1") as running:
            running.wait_for_line(r"INFO gpu-balance node=node-a .* ranks=2$")
            match = running.wait_for_line(
                r"WARN gpu-balance node=node-a rank=1 stale: last update (\d+)s ago \(stale-after 1s\)"
            )
            assert int(match.group(1)) >= 1
            assert running.scrape()["janus_monitor_ranks_stale"] == [({}, 1.0)]
            assert not any("rank=0 stale" in line for line in running.lines)
    finally:
        stop.set()
        thread.join()


def test_malformed_partial_and_foreign_files_are_ignored_with_a_warning(tmp_path):
    good = RankStatsWriter(tmp_path, 0, 0, "node-a", 0, gpu_memory_reader=injected("GPU-aaa", 10))
    good.write(1, 0.1, 1.0)
    whole = good.path.read_text()
    (tmp_path / "rank-1.json").write_text(whole[: len(whole) // 2])  # truncated mid-write
    (tmp_path / "rank-2.json").write_text("")  # created, nothing written yet
    (tmp_path / "rank-3.json").write_text(whole)  # says rank 0: copied, not this rank's
    (tmp_path / "rank-4.json").write_text(json.dumps({**json.loads(whole), "rank": 4, "schema": 99}))
    (tmp_path / "rank-5.json").write_text(json.dumps({**json.loads(whole), "rank": 5, "step": True}))
    (tmp_path / "rank-6.json").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "rank-7.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / ".rank-0.json.123.tmp").write_text(whole[:10])  # a writer's temp file: silent
    expected = {
        "rank-1.json": "not valid JSON",
        "rank-2.json": "not valid JSON",
        "rank-3.json": "holds rank 0, but the file name says rank 3",
        "rank-4.json": "schema 99 is not the supported 1",
        "rank-5.json": "field 'step' must be a non-negative integer",
        "rank-6.json": "",
        "notes.txt": "not a stats file",
        "rank-7.json": "",
    }
    with sidecar(tmp_path) as running:
        first = running.wait_for_line(r"INFO gpu-balance node=node-a used=\[10\.0\] GiB .* ranks=1$")
        for name, reason in expected.items():
            running.wait_for_line(rf"WARN ignoring {re.escape(name)} in .*: .*{re.escape(reason)}")
        # Several more scans: each bad file is warned about once (rate-limited), the sidecar lives on.
        index = running.lines.index(first.string)
        running.wait_for_line(r"ranks=1$", start=index + 1)
        running.wait_for_line(r"ranks=1$", start=len(running.lines))
        for name in expected:
            assert sum(f"ignoring {name} in" in line for line in running.lines) == 1, name
        assert not any(".tmp" in line for line in running.lines)
        series = running.scrape()
        assert series["janus_monitor_ranks_reporting"] == [({}, 1.0)]
        assert series["janus_monitor_ignored_files"] == [({}, float(len(expected)))]
        assert running.process.poll() is None


def test_sigterm_stops_the_sidecar_with_exit_code_0(tmp_path):
    with sidecar(tmp_path) as running:
        running.wait_for_line("gpu-balance waiting")
        assert running.stop() == 0
        assert any("monitor stopping on SIGTERM" in line for line in running.lines)


def test_bad_flags_are_user_errors(tmp_path):
    result = subprocess.run(
        [*JANUS_JOB, "monitor", "--stats-dir", str(tmp_path), "--warn-ratio", "1.5"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--warn-ratio must be in (0, 1]" in result.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*JANUS_JOB, "monitor", "--stats-dir", str(tmp_path),
             "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr


def test_sidecar_modules_import_neither_torch_nor_pydantic():
    code = (
        "import sys, janus_job.monitor.sidecar, janus_job.cli.monitor, janus_job.monitor.gpustats; "
        "print(sorted(m for m in ('torch', 'pydantic', 'pynvml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_spread_is_max_minus_min_over_max():
    assert memory_spread([78, 46]) == pytest.approx(32 / 78)
    assert memory_spread([50]) == 0.0
    assert memory_spread([0, 0]) == 0.0

    def stats(rank, node, used, total=80):
        return RankStats(rank, rank % 2, node, f"GPU-{rank}", used, total, None, 1, None, 0.0)

    a, b = node_balances([stats(0, "b", 40), stats(1, "b", 60), stats(2, "a", 10, 16), stats(3, "a", None)])
    assert (a.node, a.spread, a.min_headroom_bytes) == ("a", 0.0, 6)
    assert (b.node, b.spread, b.min_headroom_bytes) == ("b", pytest.approx(1 / 3), 20)
    assert [s.rank for s in a.ranks] == [2, 3]


@pytest.mark.slow
def test_gpu_balance_bench_tiny_runs_the_sidecar_module(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu_balance.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "gpu_balance_tiny.json").read_text())
    assert report["passed"] and report["card"] == "cpu (tiny)"
    assert report["checks"] == {
        "metrics_before_training": True,
        "heavy_rank_is_fullest": True,
        "imbalance_flagged": True,
        "sidecar_clean_exit": True,
    }
    assert [row["used_bytes"] for row in report["rows"]] == [int(0.1 * GIB), int(0.2 * GIB)]
    assert "exceeds warn-ratio" in report["warn_line"]

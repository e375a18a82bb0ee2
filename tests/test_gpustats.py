"""The per-rank stats writer: file format, interval, atomic replace, failure tolerance, extremes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from janus_job.monitor import gpustats
from janus_job.monitor.gpustats import (
    GpuMemory,
    MemoryExtremes,
    NvmlMemoryReader,
    RankStatsWriter,
    gather_memory_extremes,
    peak_memory_bytes,
    visible_device_id,
)

GIB = 1024**3


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cpu_rank_writes_all_fields_with_gpu_figures_null(tmp_path):
    writer = RankStatsWriter(tmp_path / "stats", rank=3, local_rank=1, node="node-a", interval_seconds=10)
    before = time.time()
    assert writer.maybe_write(step=12, step_time_s=0.25, samples_per_s=32.0)

    record = read(tmp_path / "stats" / "rank-3.json")
    assert record["schema"] == gpustats.SCHEMA_VERSION
    assert (record["rank"], record["local_rank"], record["node"]) == (3, 1, "node-a")
    assert record["gpu_available"] is False
    for field in (
        "gpu_uuid",
        "gpu_memory_used_bytes",
        "gpu_memory_total_bytes",
        "torch_allocated_bytes",
        "torch_reserved_bytes",
        "torch_peak_allocated_bytes",
    ):
        assert record[field] is None, field
    assert (record["step"], record["step_time_s"], record["samples_per_s"]) == (12, 0.25, 32.0)
    assert before <= record["timestamp"] <= time.time()
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["rank-3.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_default_nvml_reader_reports_nothing_without_a_gpu():
    reader = NvmlMemoryReader()
    assert reader() is None
    assert "CUDA" in reader.unavailable_reason


def test_maybe_write_writes_at_most_once_per_interval(tmp_path):
    writer = RankStatsWriter(tmp_path, rank=0, local_rank=0, node="n", interval_seconds=0.3)
    assert writer.maybe_write(1, 0.1, 10.0)
    assert not writer.maybe_write(2, 0.1, 10.0)
    assert read(writer.path)["step"] == 1
    time.sleep(0.35)
    assert writer.maybe_write(3, 0.1, 10.0)
    assert read(writer.path)["step"] == 3


def test_injected_gpu_reading_is_written(tmp_path):
    reading = GpuMemory(uuid="GPU-1234", used_bytes=70 * GIB, total_bytes=80 * GIB)
    writer = RankStatsWriter(tmp_path, 0, 0, "n", 1, gpu_memory_reader=lambda: reading)
    writer.write(5, 0.5, 4.0)
    record = read(writer.path)
    assert record["gpu_available"] is True
    assert record["gpu_uuid"] == "GPU-1234"
    assert record["gpu_memory_used_bytes"] == 70 * GIB
    assert record["gpu_memory_total_bytes"] == 80 * GIB


def test_failing_reader_gives_null_gpu_fields_not_an_exception(tmp_path):
    def broken() -> GpuMemory:
        raise RuntimeError("GPU fell off the bus")

    writer = RankStatsWriter(tmp_path, 0, 0, "n", 1, gpu_memory_reader=broken)
    assert writer.write(1, 0.1, 1.0)
    record = read(writer.path)
    assert record["gpu_available"] is False and record["gpu_memory_used_bytes"] is None


def test_unwritable_stats_dir_is_a_warning_not_a_crash(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the stats directory should be")
    writer = RankStatsWriter(blocker / "stats", 0, 0, "n", 0)
    with caplog.at_level("WARNING"):
        assert writer.maybe_write(1, 0.1, 1.0) is False
    assert "could not write GPU stats file" in caplog.text


def test_non_finite_throughput_is_written_as_null(tmp_path):
    writer = RankStatsWriter(tmp_path, 0, 0, "n", 1)
    writer.write(1, float("inf"), float("nan"))
    record = read(writer.path)
    assert record["step_time_s"] is None and record["samples_per_s"] is None


def test_reader_never_sees_a_partial_file(tmp_path):
    """os.replace makes every read see a whole record, even while the writer rewrites constantly."""
    writer = RankStatsWriter(tmp_path, 0, 0, "node-with-a-long-name" * 20, 0)
    writer.write(0, 0.1, 1.0)
    done = threading.Event()
    failures: list[str] = []
    reads = 0

    def reader():
        nonlocal reads
        while not done.is_set():
            text = writer.path.read_text()
            reads += 1
            try:
                json.loads(text)
            except json.JSONDecodeError:
                failures.append(text)

    thread = threading.Thread(target=reader)
    thread.start()
    for step in range(1, 400):
        writer.write(step, 0.1, 1.0)
    done.set()
    thread.join()
    assert reads > 0 and failures == []
    assert [p.name for p in tmp_path.iterdir()] == ["rank-0.json"]


def test_from_env_reads_the_pod_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(gpustats.STATS_DIR_ENV, raising=False)
    assert RankStatsWriter.from_env(interval_seconds=5) is None
    monkeypatch.setenv(gpustats.STATS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "9")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("NODE_NAME", "gpu-node-17")
    writer = RankStatsWriter.from_env(interval_seconds=5)
    assert (writer.rank, writer.local_rank, writer.node) == (9, 1, "gpu-node-17")
    assert writer.path == tmp_path / "rank-9.json"


def test_visible_device_id_respects_cuda_visible_devices():
    assert visible_device_id(1, None) == "1"
    assert visible_device_id(1, "4,6") == "6"
    assert visible_device_id(0, "GPU-aaa, GPU-bbb") == "GPU-aaa"
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        visible_device_id(2, "4,6")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_peak_memory_is_zero_on_cpu():
    assert peak_memory_bytes() == 0


def test_memory_extremes_of_a_single_process_are_the_local_value():
    assert gather_memory_extremes(123) == MemoryExtremes(min_bytes=123, max_bytes=123)


def _extremes_rank(rank: int, world: int, store: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        local = [30 * GIB, 78 * GIB, 46 * GIB][rank]
        results.put((rank, gather_memory_extremes(local)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_memory_extremes_across_real_gloo_ranks(tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    world = 3
    procs = [
        ctx.Process(target=_extremes_rank, args=(r, world, str(tmp_path / "store"), results))
        for r in range(world)
    ]
    for proc in procs:
        proc.start()
    gathered = dict(results.get(timeout=120) for _ in range(world))
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert set(gathered) == {0, 1, 2}
    assert all(e == MemoryExtremes(min_bytes=30 * GIB, max_bytes=78 * GIB) for e in gathered.values())

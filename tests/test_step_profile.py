"""bench/step_profile.py: its --tiny CPU mode end to end, and its trace summary on a known trace.

The GPU numbers come from the device; this keeps the bench from rotting, checks that what it
reports is internally consistent, and holds the profiler summary (GPU idle time, synchronisations
and their call sites, allocator calls) to hand-counted values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import step_profile  # noqa: E402  (bench/step_profile.py)


def _event(cat: str, name: str, ts: float, dur: float, tid: int = 1, **args) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def test_trace_summary_counts_idle_time_syncs_and_their_call_sites(tmp_path):
    events = [
        _event("python_function", "/x/site-packages/transformers/models/q.py(10): forward", 0, 1000),
        _event("python_function", "/w/janus_job/model.py(300): forward", 10, 500),
        _event("cpu_op", "aten::item", 100, 60),
        _event("cuda_runtime", "cudaMemcpyAsync", 110, 40, correlation=5),
        _event("cuda_runtime", "cudaStreamSynchronize", 150, 5),
        _event("cuda_runtime", "cudaMalloc", 600, 10),
        _event("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 140, 2, tid=7, correlation=5),
        _event("kernel", "sm90_xmma_gemm_bf16", 0, 100, tid=7),
        _event("kernel", "elementwise_kernel", 300, 50, tid=7),
        _event("kernel", "flash_fwd_kernel", 350, 100, tid=7),
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    out = step_profile.summarize_trace(trace, steps=2)
    gpu = out["gpu"]
    # busy: [0,100] + [140,142] + [300,450] = 252 us of a 450 us window, per 2 micro-steps
    assert gpu["busy_s_per_micro_step"] == pytest.approx(252e-6 / 2)
    assert gpu["idle_s_per_micro_step"] == pytest.approx(198e-6 / 2)
    assert gpu["kernel_launches_per_micro_step"] == 1.5
    assert out["kernel_classes_s_per_micro_step"]["matmul"] == pytest.approx(50e-6)
    assert out["kernel_classes_s_per_micro_step"]["attention"] == pytest.approx(50e-6)
    assert out["syncs_per_micro_step"] == {"D2H copy": 0.5, "cudaStreamSynchronize": 0.5}
    sites = {s["site"] for s in out["sync_sites"]}
    assert "cudaStreamSynchronize: janus_job/model.py:300 forward <- transformers/models/q.py:10 forward" in sites
    assert out["allocator_calls_per_micro_step"]["cudaMalloc"]["calls"] == 0.5
    assert out["idle_gaps_over_20us"]["s_per_micro_step"] == pytest.approx(198e-6 / 2)
    assert out["idle_gap_sites"][0]["host_at_gap_start"].startswith("janus_job/model.py:300 forward")


@pytest.mark.slow
def test_tiny_profile_runs_the_products_step_beside_the_probe(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "step_profile.py"), "--tiny", "--out", str(tmp_path),
           "--variants", "before,no_syncs,compiled,fp8_tensorwise,fp8_rowwise", "--passes", "1",
           "--profile-samples", "1",
           "--compile-backend", "aot_eager"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(tmp_path.glob("tiny-*-cpu-1-step-profile.json"))
    assert len(files) == 1, proc.stdout
    report = json.loads(files[0].read_text())
    assert report["card"] == "cpu" and report["tiny"] is True and report["samples"] == 3
    assert report["spec"]["zero_stage"] == 1 and report["spec"]["lean_activations"] is True
    probe = report["probe"]["s_per_micro_step"]
    assert probe["fwd_bwd"] == pytest.approx(probe["forward"] + probe["backward"])
    assert set(report["variants"]) == {"before", "no_syncs", "compiled", "fp8_tensorwise", "fp8_rowwise"}
    for name, row in report["variants"].items():
        assert "error" not in row, row.get("traceback")
        s = row["s_per_micro_step"]
        assert s["fwd_bwd"] == pytest.approx(s["forward"] + s["backward"])
        assert 0 < s["llm_forward"] < s["forward"]
        assert s["micro_step"] >= s["fwd_bwd"]
        assert row["fwd_bwd_vs_probe"] == pytest.approx(s["fwd_bwd"] / probe["fwd_bwd"])
        assert row["prediction"] and row["description"]
    assert "compile_s" in report["variants"]["compiled"]
    # the tiny model's two inner decoder layers, 7 projections each, in float8 under both recipes
    assert report["variants"]["fp8_tensorwise"]["fp8_linears"] == report["variants"]["fp8_rowwise"]["fp8_linears"] == 14
    for name in ("before", "no_syncs", "compiled"):
        assert report["variants"][name]["profile"]["micro_steps"] == 1
    assert "fwd+bwd" in proc.stdout and files[0].with_suffix(".txt").exists()

"""bench/fp8.py --tiny: the product trainer run in bf16 and in fp8 from the same weights and data, per-step
losses compared within the bench's tolerance, on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_fp8_bench_compares_the_trainers_loss_curves(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fp8.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = tmp_path.glob("fp8-*-cpu-1-tiny.json")
    report = json.loads(path.read_text())
    assert report["status"] == "passed" and report["size"] == "tiny"
    runs = report["runs"]
    assert list(runs) == ["bf16", "fp8_tensorwise"]
    assert "precision=bf16 " in runs["bf16"]["start_line"]
    assert "precision=fp8/tensorwise " in runs["fp8_tensorwise"]["start_line"]
    steps = [[r["step"] for r in run["records"]] for run in runs.values()]
    assert steps[0] == steps[1] == [1, 2, 3, 4]
    # the same weights and batches: step 1's loss differs only by float8's rounding
    first = [run["records"][0]["loss"] for run in runs.values()]
    tolerance = report["tolerance"]["window_mean_rel_diff_below"]
    assert first[0] != first[1] and abs(first[1] - first[0]) / first[0] < tolerance
    versus = runs["fp8_tensorwise"]["vs_bf16"]
    assert versus["compared_steps"] == 4 and versus["window_steps"] == 2 and versus["within_tolerance"] is True
    assert versus["window_mean_rel_diff"] < versus["tolerance"] == 0.02 and versus["mean_rel_diff"] >= 0
    assert (path.parent / f"{path.stem}-logs" / "train-fp8_tensorwise.log").exists()

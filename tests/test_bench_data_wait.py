"""bench/data_wait.py in --tiny mode: the product trainer's own data-wait figure, read from its metrics
records, on the stages the device runs (synthetic frames, precompute into a file:// store, `torchrun ...
janus-job train` with the spec's loader defaults), with the demo's tiny models on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import data_wait  # noqa: E402  (bench/data_wait.py)

pytestmark = pytest.mark.slow


def test_tiny_run_records_the_trainers_data_wait_per_step(tmp_path):
    import subprocess

    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench" / "data_wait.py"), "--tiny", "--out", str(out), "--workdir", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert proc.returncode in (0, 1), proc.stdout[-4000:] + proc.stderr[-3000:]  # 1: waited over the goal
    [path] = out.glob("data_wait-*-cpu-1-tiny.json")
    report = json.loads(path.read_text())
    assert report["status"] in ("passed", "wait_over_goal") and report["card"] == "cpu"
    run = report["runs"]["default"]
    from janus_job.config.spec import DataSpec

    assert run["loader"]["prefetch_batches"] == DataSpec.model_fields["prefetch_batches"].default
    assert run["loader"]["persistent_workers"] is True and run["loader"]["num_workers"] == 2
    steps = report["spec"]["training"]["max_steps"]
    assert [r["step"] for r in run["records"]] == list(range(1, steps + 1))
    # the figure is the trainer's own: its log line's data_wait, step by step
    for record, line in zip(run["records"], run["log_lines"]):
        assert f"data_wait={100 * record['data_wait']:.1f}%" in line
    summary = run["summary"]
    kept = [r for r in run["records"] if r["step"] > report["skip_steps"]]
    assert summary["steps"] == len(kept) >= 1
    assert summary["data_wait"] == pytest.approx(
        sum(r["data_wait"] * r["s_per_it"] for r in kept) / sum(r["s_per_it"] for r in kept))
    assert report["check"]["passed"] == (summary["data_wait"] < data_wait.WAIT_GOAL)
    assert "data wait %" in proc.stdout


def test_wait_summary_weights_steps_by_their_time():
    records = [{"event": "train", "step": 1, "s_per_it": 10.0, "data_wait": 0.5, "samples_per_s": 1.0},
               {"event": "train", "step": 2, "s_per_it": 1.0, "data_wait": 0.10, "samples_per_s": 4.0},
               {"event": "train", "step": 3, "s_per_it": 3.0, "data_wait": 0.02, "samples_per_s": 2.0},
               {"event": "done", "step": 3}]
    summary = data_wait.wait_summary(records, skip=1)
    assert summary["steps"] == 2 and summary["first_step"] == 2
    assert summary["data_wait"] == pytest.approx((0.1 * 1 + 0.02 * 3) / 4)
    assert (summary["worst"], summary["worst_step"]) == (0.10, 2)

"""bench/two_nodes.py in --cpu mode: two `janus-job launch` "nodes" (the PyTorchJob's Master and Worker
env, static and elastic) running the real trainer over gloo; a SIGTERM to the Worker, the resume
at 2 nodes (exactly the uninterrupted run) and at 1 node (same samples and lr, loss within 1e-4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

CHECKS = ["a_ran", "a_elastic_ran", "network_line", "elastic_equals_static_samples", "elastic_equals_static_loss",
          "elastic_equals_static_lr", "b_stopped_with_checkpoint", "b_resumed_at_stop_step", "b_equals_a_samples",
          "b_equals_a_loss", "b_equals_a_lr", "c_resumed_at_one_node", "c_samples", "c_lr", "c_loss"]


def test_two_cpu_nodes_stop_and_resume_at_two_and_one(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "two_nodes.py"), "--cpu", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=2400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    files = list(out.glob("*-cpu-2-two_nodes.json"))
    assert len(files) == 1, proc.stdout[-2000:]
    report = json.loads(files[0].read_text())
    assert report["status"] == "passed" and report["card"] == "cpu" and report["backend"] == "gloo"
    assert [c["name"] for c in report["checks"]] == CHECKS and all(c["passed"] for c in report["checks"])
    # the summary lines close the output, one per check
    tail = proc.stdout.strip().splitlines()[-len(CHECKS):]
    assert [line.split(":")[0] for line in tail] == [f"check {name}" for name in CHECKS]
    assert all(": PASS " in line for line in tail)

    steps = report["steps"]
    runs = report["runs"]
    # both nodes got the operator's variables and torchrun's node ranks
    static, elastic = runs["a"]["node_env"], runs["a_elastic"]["node_env"]
    assert [e["PET_NODE_RANK"] for e in static] == ["0", "1"] and all(e["PET_NNODES"] == "2" for e in static)
    assert all(e["PET_RDZV_BACKEND"] == "c10d" and e["PET_NNODES"] == "2:2" for e in elastic)
    assert all(e["NCCL_NVLS_ENABLE"] == "0" for e in static + elastic)
    assert runs["a"]["network_lines"][0].startswith("network transport=gloo nodes=2 ranks=2 ")
    assert len(runs["a"]["step_lines"]) == 2 * steps  # each node's first rank prints the line

    a = {r["step"]: r for r in report["scenarios"]["a"]["records"]}
    b = report["scenarios"]["b"]
    stop = b["stop_step"]
    assert b["signalled_at_step"] <= stop < steps and b["complete_checkpoints"][-1] == stop
    # the ranks exit 143 after the stop's checkpoint; each node's process is torchrun, which then exits 1
    # (docs/operations.md; the same codes on 2 x H200: bench/results/2026-11-30-nvidia-h200-2-two_nodes.json)
    assert runs["b_stop"]["exit_codes"] == [1, 1] and len(runs["b_stop"]["stopped_lines"]) == 2
    assert {r["step"]: r for r in b["records"]} == a
    c = {r["step"]: r for r in report["scenarios"]["c"]["records"] if r["step"] > stop}
    assert sorted(c) == list(range(stop + 1, steps + 1))
    for step, record in c.items():
        assert record["samples"] == a[step]["samples"] and record["lr"] == a[step]["lr"]
        assert record["loss"] == pytest.approx(a[step]["loss"], rel=report["loss_tolerance_rel"])
    assert report["loss_tolerance_rel"] == 1e-4

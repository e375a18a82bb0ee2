"""bench/train_full.py in --tiny mode: the full-size trainer check's orchestration on CPU.

The same stages the device runs (checkpoints, synthetic 640x480 dataset, precompute into a file://
store, two `torchrun` trainer runs with real DeepSpeed ZeRO-2 over gloo that differ only in
features.mode) with the demo's tiny models; the step-1 loss from precomputed features must equal
the online encoders' (fp32, rel. error <= 1e-6). Also: a failing or hanging stage is reported by
name and its whole process tree is killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_scaled

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_full  # noqa: E402  (bench/train_full.py)


@pytest.mark.slow
def test_tiny_run_gives_the_same_step1_loss_from_the_store_and_online(tmp_path):
    out = tmp_path / "out"
    work = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench" / "train_full.py"), "--tiny", "--gpus", "2", "--out", str(out),
           "--workdir", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    files = list(out.glob("train_full-*-cpu-2-tiny.json"))
    assert len(files) == 1, proc.stdout[-2000:]
    report = json.loads(files[0].read_text())

    assert report["status"] == "passed" and report["card"] == "cpu" and report["gpus"] == 2
    assert report["specs_differ_in"] == ["features.cache_vision", "features.mode"]
    comparison = report["comparison"]
    assert comparison["bound"] == 1e-6 and comparison["rel_error"] <= 1e-6
    assert comparison["loss_precomputed"] > 0 and comparison["loss_online"] > 0
    steps = report["spec"]["training"]["max_steps"]
    for mode in ("precomputed", "online"):
        run = report["runs"][mode]
        assert "world=2" in run["start_line"] and "zero=2" in run["start_line"]
        assert [line.split()[1] for line in run["log_lines"]] == [f"step={s}/{steps}" for s in range(1, steps + 1)]
        assert all("mfu=n/a" in line for line in run["log_lines"])  # no peak FLOP/s known for a CPU
        assert run["step1_loss"] == pytest.approx(float(run["log_lines"][0].split("loss=")[1].split()[0]), abs=1e-4)
        # both ranks finished with the same weights (data-parallel replicas agree)
        norms = run["param_norms"]
        assert set(norms) == {0, 1} or set(norms) == {"0", "1"}
        assert len(set(norms.values())) == 1
    # the store really was filled and read: precompute ran, and its objects are in the work dir
    assert report["stages_s"]["precompute"] > 0
    assert any((work / "store" / "spatial").rglob("*.jnsf")) and any((work / "store" / "vision").rglob("*.jnsf"))


def test_a_failing_stage_is_named_with_its_output(tmp_path):
    command = [sys.executable, "-c", "import sys; print('about to fail'); sys.exit(3)"]
    with pytest.raises(train_full.StageFailed) as err:
        train_full.run_stage("precompute", command, dict(os.environ), 30, tmp_path)
    assert err.value.stage == "precompute"
    assert "exit status 3" in str(err.value) and "about to fail" in str(err.value)
    assert "about to fail" in (tmp_path / "precompute.log").read_text()


def test_a_hanging_stage_is_killed_with_its_children(tmp_path):
    marker = tmp_path / "child.pid"
    # a parent that starts a sleeping child in a session of its own (as torchrun does with ranks)
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        f"open({str(marker)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    with pytest.raises(train_full.StageFailed) as err:  # the stage would exit 0 after 120 s if not killed
        train_full.run_stage("train-online", [sys.executable, "-c", script], dict(os.environ), 3, tmp_path)
    assert err.value.stage == "train-online" and "no result within 3s" in str(err.value)
    child = int(marker.read_text())
    deadline = time.monotonic() + load_scaled(10)  # SIGKILLed: gone as soon as it is scheduled
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

"""`janus-job demo`, the README's first command, runs end to end on this machine."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from conftest import JANUS_JOB

DEMO_BUDGET_S = 300  # the README promises under 5 minutes on a 2-core CPU machine


@pytest.mark.slow
def test_demo_runs_end_to_end_and_prints_the_training_log_line(tmp_path):
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "JANUS_STATS_DIR")}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [*JANUS_JOB, "demo", "--workdir", str(workdir), "--steps", "4"],
        capture_output=True, text=True, env=env, timeout=DEMO_BUDGET_S,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "precompute: complete, 24 samples covered" in out
    steps = re.findall(r"^train step=(\d+)/4 s/it=\S+ samples/s=\S+ tokens/s=\S+ mfu=\S+ data_wait=\S+ "
                       r"mem_peak=\S+ mem_min=\S+ mem_max=\S+ loss=([\d.]+) lr=\S+ eta=\S+$", out, re.M)
    assert [int(s) for s, _ in steps] == [1, 2, 3, 4], out
    assert all(0 < float(loss) < 100 for _, loss in steps)
    assert (workdir / "job.yaml").exists() and (workdir / "store").is_dir()
    assert re.search(r"^demo: done in [\d.]+s", out, re.M)

    # the demo's store verifies against the demo's own spec with the command a user runs: its
    # checkpoints describe themselves, so no option tells verify which encoders they are
    verify = subprocess.run(
        [*JANUS_JOB, "features", "verify", "--spec", str(workdir / "job.yaml"), "--json"],
        capture_output=True, text=True, env=env, timeout=DEMO_BUDGET_S,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = json.loads(verify.stdout)
    assert report["missing_samples"] == 0 and report["complete_marker"] and report["fingerprint_checked"] == "full"


def test_demo_refuses_a_non_empty_workdir(tmp_path):
    from janus_job.demo.run import run_demo
    from janus_job.errors import JobError

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(JobError, match="is not empty"):
        run_demo(workdir=str(tmp_path))
    assert (tmp_path / "precious.txt").read_text() == "keep me"

"""Exact resume after a killed rank, under real torchrun + real DeepSpeed ZeRO-2 (gloo, CPU).

torchrun's elastic agent restarts the whole worker group when one rank dies (as the PyTorchJob's
elastic policy does with pods); the restarted ranks must continue from the newest complete
checkpoint and train exactly what an uninterrupted run trains: same samples per step on the same
ranks, same loss and learning rate (dropout is on, so the RNG states must be restored too).
"""

from __future__ import annotations

import json
import os

import ckpt_worker as worker
import pytest
from conftest import load_scaled

pytestmark = pytest.mark.slow

STEPS = 8
INTERVAL = 3


def _args(tmp, store_url, log):
    return ["--url", store_url, "--staging", str(tmp / "staging"), "--step-log", str(log),
            "--steps", str(STEPS), "--interval", str(INTERVAL), "--keep", "2"]


def _check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    log = tmp / "steps.jsonl"
    _check(worker.torchrun(2, _args(tmp, str(tmp / "store"), log)))
    steps = worker.effective_steps(worker.read_log(log))
    assert sorted(steps) == list(range(1, STEPS + 1))
    return steps


def _starts(records):
    return [(r["attempt"], r["resumed_from"]) for r in records if r["event"] == "start"]


def _assert_same_training(steps, reference):
    assert sorted(steps) == sorted(reference)
    for step in reference:
        assert steps[step]["ids"] == reference[step]["ids"], f"step {step} trained other samples"
        assert steps[step]["loss"] == reference[step]["loss"], f"step {step}: loss differs"
        assert steps[step]["lr"] == reference[step]["lr"], f"step {step}: lr differs"
    trained = [i for step in sorted(steps) for rank_ids in steps[step]["ids"] for i in rank_ids]
    assert len(trained) == len(set(trained)), "a sample was trained twice in the surviving sequence"


def test_sigkill_of_one_rank_resumes_exactly_from_s3(tmp_path, uninterrupted, s3_server, s3_bucket, s3_env):
    log = tmp_path / "steps.jsonl"
    url = f"s3://{s3_bucket}/runs/demo/checkpoints"
    env = {**s3_env, "AWS_ENDPOINT_URL": s3_server}
    # rank 1 SIGKILLs itself in the middle of step 5 (after a backward, before the optimizer step);
    # synchronous upload so that the step-3 checkpoint is surely complete by then
    result = worker.torchrun(2, _args(tmp_path, url, log) + ["--die-at-step", "5", "--die-rank", "1", "--sync-upload"],
                             max_restarts=1, env=env)
    _check(result)
    records = worker.read_log(log)
    assert _starts(records) == [(0, None), (1, 3)], "the restart must resume from the step-3 checkpoint"
    first_attempt = [r["step"] for r in records if r["event"] == "step" and r["attempt"] == 0]
    second_attempt = [r["step"] for r in records if r["event"] == "step" and r["attempt"] == 1]
    assert first_attempt == [1, 2, 3, 4]
    # only what came after the last complete checkpoint is trained again
    assert second_attempt == list(range(4, STEPS + 1))
    _assert_same_training(worker.effective_steps(records), uninterrupted)


def test_checkpoint_killed_mid_write_is_never_resumed(tmp_path, uninterrupted):
    store = tmp_path / "store"
    log = tmp_path / "steps.jsonl"
    # leftovers a crashed run could leave: a newer step without COMPLETE, and one whose COMPLETE
    # lists a file that is missing
    (store / "step-00000099").mkdir(parents=True)
    (store / "step-00000099" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    (store / "step-00000098").mkdir()
    (store / "step-00000098" / "COMPLETE").write_text(json.dumps(
        {"format": 1, "step": 98, "world_size": 2, "files": {"mp_rank_00_model_states.pt": 10}}))
    # rank 1 dies after uploading the first file of the step-6 checkpoint (rank 0 keeps going
    # until the next collective fails)
    result = worker.torchrun(
        2, _args(tmp_path, str(store), log) + ["--die-during-save", "6", "--die-rank", "1"], max_restarts=1)
    _check(result)
    records = worker.read_log(log)
    assert _starts(records) == [(0, None), (1, 3)], "resumed from something other than the last complete one"
    _assert_same_training(worker.effective_steps(records), uninterrupted)
    # the interrupted step-6 was written again by the restarted run and completed this time
    from janus_job.train.checkpoint import CheckpointManager

    manager = CheckpointManager(str(store), 2, INTERVAL, rank=0, world_size=1, staging_dir=tmp_path / "s")
    assert [ref.step for ref in manager.complete_checkpoints()] == [3, 6]
    assert not (store / "step-00000099" / "COMPLETE").exists()


def _uninterrupted_trainer_run(base, tmp_path):
    """The real trainer on `base` without interruption: trace in ref-{rank}.jsonl, log in stdout."""
    import subprocess

    spec = worker.trainer_spec(base, tmp_path / "ref.yaml", tmp_path / "ref-checkpoints")
    result = subprocess.run(worker.trainer_command(2, spec), cwd=worker.REPO, capture_output=True, text=True,
                            env=worker.trainer_env(tmp_path / "ref-{rank}.jsonl", tmp_path / "staging-ref"),
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def test_real_trainer_survives_sigkill_of_a_rank(tmp_path):
    """`janus_job.train.trainer` under torchrun as the elastic PyTorchJob starts it: rank 1 is SIGKILLed from
    outside mid-run; torchrun restarts both ranks, the trainer resumes from its newest complete
    checkpoint, and the samples trained (per rank, step, micro-step), losses and lrs equal an
    uninterrupted run's."""
    import signal
    import subprocess
    import time

    import psutil

    base = worker.trainer_job(tmp_path / "job", steps=40, interval=5)
    reference = _uninterrupted_trainer_run(base, tmp_path)

    spec = worker.trainer_spec(base, tmp_path / "killed.yaml", tmp_path / "checkpoints")
    trace = tmp_path / "killed-{rank}.jsonl"
    out = open(tmp_path / "killed.out", "w+")
    proc = subprocess.Popen(worker.trainer_command(2, spec, max_restarts=1), cwd=worker.REPO, stdout=out,
                            stderr=subprocess.STDOUT, env=worker.trainer_env(trace, tmp_path / "staging"))
    killed_at = None
    deadline = time.time() + load_scaled(240)
    rank1_trace = str(trace).format(rank=1)
    while killed_at is None and proc.poll() is None and time.time() < deadline:
        steps = []
        if os.path.exists(rank1_trace):
            with open(rank1_trace) as f:
                steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
        if steps and max(steps) >= 12:  # past the step-10 checkpoint
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    env = child.environ()
                except psutil.Error:
                    continue
                if env.get("RANK") == "1" and env.get("TORCHELASTIC_RESTART_COUNT") == "0":
                    child.send_signal(signal.SIGKILL)
                    killed_at = max(steps)
                    break
        time.sleep(0.005)
    assert proc.wait(timeout=240) == 0
    out.seek(0)
    stdout = out.read()
    assert killed_at is not None, "the run ended before rank 1 could be killed"
    starts = [line for line in stdout.splitlines() if line.startswith("train start")]
    assert len(starts) == 2 and "resumed_from=" in starts[1], stdout[-3000:]
    resumed_at = int(starts[1].rsplit("at step ", 1)[1])
    assert 0 < resumed_at <= killed_at and resumed_at % 5 == 0
    assert worker.trained_samples(trace, (0, 1)) == worker.trained_samples(tmp_path / "ref-{rank}.jsonl", (0, 1))
    assert worker.logged_steps(stdout) == worker.logged_steps(reference.stdout)


def test_real_trainer_checkpoints_on_sigterm_and_resumes_there(tmp_path):
    """A pod's SIGTERM reaches torchrun, which forwards it to the ranks: they finish the step, save
    it (not a checkpoint step), exit non-zero; the next start resumes at that step, and the
    samples, losses and lrs of both parts equal an uninterrupted run's."""
    import signal
    import subprocess
    import time

    import yaml

    from janus_job.train.checkpoint import CheckpointManager
    from janus_job.train.stop import EXIT_CODE

    base = worker.trainer_job(tmp_path / "job", steps=30, interval=1000)  # no interval checkpoint
    job = yaml.safe_load(base.read_text())
    job["data"]["num_workers"] = 2  # torchrun signals the whole process group, loader workers too
    base.write_text(yaml.safe_dump(job))
    reference = _uninterrupted_trainer_run(base, tmp_path)

    spec = worker.trainer_spec(base, tmp_path / "stopped.yaml", tmp_path / "checkpoints")
    trace = tmp_path / "stopped-{rank}.jsonl"
    env = worker.trainer_env(trace, tmp_path / "staging")
    proc = subprocess.Popen(worker.trainer_command(2, spec), cwd=worker.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    signalled_at = None
    deadline = time.time() + load_scaled(240)
    rank0_trace = str(trace).format(rank=0)
    while signalled_at is None and proc.poll() is None and time.time() < deadline:
        if os.path.exists(rank0_trace):
            with open(rank0_trace) as f:
                steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
            if steps and max(steps) >= 5:
                proc.send_signal(signal.SIGTERM)  # what the kubelet sends the pod's torchrun
                signalled_at = max(steps)
        time.sleep(0.005)
    first = proc.communicate(timeout=240)[0]
    assert signalled_at is not None, "the run ended before it could be signalled"
    assert proc.returncode != 0, "a stopped run must not look finished to the operator"
    stopped = [line for line in first.splitlines() if line.startswith("train stopped step=")]
    assert len(stopped) == 1 and f"exiting with {EXIT_CODE}" in stopped[0], first[-3000:]
    stop_step = int(stopped[0].split("step=", 1)[1].split("/", 1)[0])
    assert signalled_at < stop_step < 30
    refs = CheckpointManager(str(tmp_path / "checkpoints"), keep=3, interval_steps=1000, rank=0,
                             world_size=2).complete_checkpoints()
    assert [r.step for r in refs] == [stop_step]

    second = subprocess.run(worker.trainer_command(2, spec), cwd=worker.REPO, capture_output=True, text=True,
                            env=env, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-6000:]
    starts = [line for line in second.stdout.splitlines() if line.startswith("train start")]
    assert len(starts) == 1 and starts[0].endswith(f"at step {stop_step}"), second.stdout[-3000:]
    assert worker.trained_samples(trace, (0, 1)) == worker.trained_samples(tmp_path / "ref-{rank}.jsonl", (0, 1))
    assert worker.logged_steps(first + second.stdout) == worker.logged_steps(reference.stdout)

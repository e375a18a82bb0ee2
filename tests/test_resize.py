"""Resize: a checkpoint saved at one world size resumes at another with resharded ZeRO state.

For each (old, new) world size, under real torchrun + DeepSpeed ZeRO-2 (gloo, CPU):
1. train at `old` ranks to step 4, checkpoint, stop (the scale event); the worker also gathers
   the full fp32 master weights and Adam moments to rank 0 right before saving;
2. resume at `new` ranks (the checkpoint is converted to DeepSpeed's universal layout and
   resharded) and gather the same state right after loading: it must equal the saved state;
3. reference: a fresh run at `new` ranks that gets that gathered state put directly into its
   optimizer (no checkpoint code) and trains the same steps. The resumed run's losses and
   learning rates must equal the reference's exactly: same global batch (accumulation
   adjusted), same samples per step, same schedule position.
"""

from __future__ import annotations

import ckpt_worker as worker
import pytest
import torch

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8
MICRO = 2
SAVE_AT = 4
STEPS = 7


def _args(tmp, url, log, *extra):
    return ["--url", str(url), "--staging", str(tmp / "staging"), "--step-log", str(log), "--steps", str(STEPS),
            "--interval", str(SAVE_AT), "--global-batch", str(GLOBAL_BATCH), "--micro", str(MICRO),
            "--dropout", "0", "--sync-upload", *extra]


def _check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (2, 4)])
def test_resize_resumes_with_resharded_state(tmp_path, old, new):
    store = tmp_path / "store"
    saved, loaded = tmp_path / "saved.pt", tmp_path / "loaded.pt"
    _check(worker.torchrun(old, _args(tmp_path, store, tmp_path / "before.jsonl", "--stop-after", str(SAVE_AT),
                                      "--dump-at-save", str(saved))))
    _check(worker.torchrun(new, _args(tmp_path, store, tmp_path / "after.jsonl", "--dump-after-load", str(loaded))))
    _check(worker.torchrun(new, _args(tmp_path, tmp_path / "empty-store", tmp_path / "reference.jsonl",
                                      "--reference-state", str(saved))))

    before = torch.load(saved, weights_only=False)
    after = torch.load(loaded, weights_only=False)
    assert before["params"].keys() == after["params"].keys() and before["params"]
    for name, states in before["params"].items():
        for key, value in states.items():
            assert torch.equal(value, after["params"][name][key]), f"{name}.{key} changed across the resize"
    assert before["adam_step"] == after["adam_step"] == [float(SAVE_AT)]
    assert before["lr"] == after["lr"]
    assert before["sampler"] == after["sampler"]

    resumed_log = worker.read_log(tmp_path / "after.jsonl")
    start = resumed_log[0]
    assert (start["world"], start["resumed_from"]) == (new, SAVE_AT)
    assert start["accumulation"] == GLOBAL_BATCH // (MICRO * new)
    resumed = worker.effective_steps(resumed_log)
    reference = worker.effective_steps(worker.read_log(tmp_path / "reference.jsonl"))
    assert sorted(resumed) == sorted(reference) == list(range(SAVE_AT + 1, STEPS + 1))
    for step in reference:
        assert resumed[step]["ids"] == reference[step]["ids"]
        assert resumed[step]["loss"] == reference[step]["loss"], f"step {step}: loss after resume differs"
        assert resumed[step]["lr"] == reference[step]["lr"]
    # step SAVE_AT+1 trains the global batch the sampler defines for it at any world size
    from janus_job.data.sampler import BalancedBatchSampler

    _, _, lengths, ids = worker.dataset()
    sampler = BalancedBatchSampler(lengths, micro_batch_size=MICRO, world_size=old, rank=0,
                                   global_batch_size=GLOBAL_BATCH, seed=5)
    expected = sorted(ids[i] for i in sampler.global_batch(0, SAVE_AT))
    assert sorted(i for rank_ids in resumed[SAVE_AT + 1]["ids"] for i in rank_ids) == expected


def test_resume_with_another_global_batch_is_refused(tmp_path):
    store = tmp_path / "store"
    _check(worker.torchrun(1, _args(tmp_path, store, tmp_path / "a.jsonl", "--stop-after", str(SAVE_AT))))
    args = _args(tmp_path, store, tmp_path / "b.jsonl")
    args[args.index("--global-batch") + 1] = "12"
    result = worker.torchrun(1, args)
    assert result.returncode != 0
    assert "global batch 8" in result.stderr and "training.global_batch_size: 8" in result.stderr


def test_real_trainer_resumes_at_another_world_size(tmp_path):
    """`janus_job.train.trainer` saved at 2 ranks resumes at 1 rank (accumulation 1 -> 2) from the step-4
    checkpoint: same samples per step, same lr, same loss (to the log line's precision) as the
    2-rank continuation from that checkpoint, which itself equals the original run."""
    import shutil
    import subprocess

    from typer.testing import CliRunner

    from janus_job.cli import app

    base = worker.trainer_job(tmp_path / "job", steps=12, interval=4)

    def train(nproc, name):
        spec = worker.trainer_spec(base, tmp_path / f"{name}.yaml", tmp_path / f"{name}-checkpoints")
        result = subprocess.run(
            worker.trainer_command(nproc, spec),
            cwd=worker.REPO,
            capture_output=True,
            text=True,
            env=worker.trainer_env(tmp_path / f"{name}-{{rank}}.jsonl", tmp_path / f"staging-{name}"),
            timeout=300,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        return result.stdout

    original = train(2, "original")
    for name in ("one", "two"):  # the store as it was when the job stopped after step 4
        shutil.copytree(tmp_path / "original-checkpoints", tmp_path / f"{name}-checkpoints")
        pinned = CliRunner().invoke(app, ["checkpoint", "resume-from", str(tmp_path / f"{name}-checkpoints"), "4"])
        assert pinned.exit_code == 0, pinned.output
    one, two = train(1, "one"), train(2, "two")
    assert "world=1" in one and "accum=2" in one and "at step 4" in one
    assert "world=2" in two and "accum=1" in two and "at step 4" in two

    def per_step(name, ranks):
        samples = {}
        for (_, step, _), ids in worker.trained_samples(tmp_path / f"{name}-{{rank}}.jsonl", ranks).items():
            samples.setdefault(step, set()).update(ids)
        return samples

    assert (
        per_step("one", (0,))
        == per_step("two", (0, 1))
        == {step: ids for step, ids in per_step("original", (0, 1)).items() if step >= 4}
    )
    logged = {name: worker.logged_steps(out) for name, out in (("one", one), ("two", two), ("original", original))}
    assert sorted(logged["one"]) == sorted(logged["two"]) == list(range(5, 13))
    for step in range(5, 13):
        assert logged["two"][step] == logged["original"][step]
        assert logged["one"][step][1] == logged["two"][step][1]  # lr
        assert logged["one"][step][0] == pytest.approx(logged["two"][step][0], abs=2e-4)  # loss, printed to 1e-4


def test_zero3_checkpoint_reshards_too(tmp_path):
    """ZeRO-3 (parameters partitioned as well): 2 -> 1 ranks, gathered state equal after loading."""
    store = tmp_path / "store"
    saved, loaded = tmp_path / "saved.pt", tmp_path / "loaded.pt"
    _check(
        worker.torchrun(
            2,
            _args(
                tmp_path,
                store,
                tmp_path / "a.jsonl",
                "--stage",
                "3",
                "--stop-after",
                str(SAVE_AT),
                "--dump-at-save",
                str(saved),
            ),
        )
    )
    _check(
        worker.torchrun(
            1, _args(tmp_path, store, tmp_path / "b.jsonl", "--stage", "3", "--dump-after-load", str(loaded))
        )
    )
    before = torch.load(saved, weights_only=False)
    after = torch.load(loaded, weights_only=False)
    assert before["params"] and before["params"].keys() == after["params"].keys()
    for name, states in before["params"].items():
        for key, value in states.items():
            assert torch.equal(value, after["params"][name][key]), f"{name}.{key} changed across the resize"
    assert worker.effective_steps(worker.read_log(tmp_path / "b.jsonl"))[STEPS]["loss"] > 0

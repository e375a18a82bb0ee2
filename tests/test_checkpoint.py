"""Checkpoint discovery and retention on a mounted path and on a real S3-protocol server.

(Saving and loading real DeepSpeed state is covered under torchrun in test_resume/test_resize.)
"""

from __future__ import annotations

import json

import fsspec
import pytest

from janus_job.errors import JobError
from janus_job.train.checkpoint import COMPLETE, CheckpointManager, step_tag


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    request.getfixturevalue("monkeypatch").setenv("AWS_ENDPOINT_URL", server)
    return f"s3://{bucket}/run/checkpoints"


def _manager(url, tmp_path, keep=2):
    return CheckpointManager(url, keep, 10, rank=0, world_size=1, staging_dir=tmp_path / "staging")


def _write(url, step, files, manifest="auto"):
    fs, root = fsspec.core.url_to_fs(url)
    base = f"{root}/{step_tag(step)}"
    fs.makedirs(base, exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(f"{base}/{name}", data)
    if manifest == "auto":
        manifest = json.dumps({"format": 1, "step": step, "world_size": 2,
                               "files": {n: len(d) for n, d in files.items()}})
    if manifest is not None:
        fs.pipe_file(f"{base}/{COMPLETE}", manifest.encode() if isinstance(manifest, str) else manifest)
    return fs, base


SHARDS = {"mp_rank_00_model_states.pt": b"model" * 10, "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"opt" * 7}


def test_latest_is_the_newest_complete_checkpoint_only(store_url, tmp_path):
    manager = _manager(store_url, tmp_path)
    assert manager.latest() is None  # nothing there yet (not even the root)
    _write(store_url, 10, SHARDS)
    _write(store_url, 20, SHARDS)
    _write(store_url, 30, SHARDS, manifest=None)  # interrupted: no marker
    _write(store_url, 40, SHARDS, manifest="{not json")  # marker cut short
    _write(store_url, 50, {**SHARDS, "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"op"},
           manifest=json.dumps({"format": 1, "step": 50, "world_size": 2,
                                "files": {n: len(d) for n, d in SHARDS.items()}}))  # a shard is short
    _write(store_url, 60, {"mp_rank_00_model_states.pt": b"x"},
           manifest=json.dumps({"format": 1, "step": 60, "world_size": 2,
                                "files": {"mp_rank_00_model_states.pt": 1, "rng-rank-00001.pt": 5}}))  # missing file
    fs, root = fsspec.core.url_to_fs(store_url)
    fs.makedirs(f"{root}/step-70.tmp", exist_ok=True)
    fs.pipe_file(f"{root}/step-70.tmp/{COMPLETE}", b"{}")  # not a checkpoint name

    ref = manager.latest()
    assert ref is not None and ref.step == 20 and ref.world_size == 2
    assert ref.url == f"{store_url.rstrip('/')}/{step_tag(20)}"
    assert [r.step for r in manager.complete_checkpoints()] == [10, 20]
    assert manager.ref_for_step(10).step == 10
    with pytest.raises(JobError, match=r"no complete checkpoint for step 30 .*\[10, 20\]"):
        manager.ref_for_step(30)


def test_prune_keeps_the_newest_complete_and_leaves_later_writes_alone(store_url, tmp_path):
    manager = _manager(store_url, tmp_path, keep=2)
    for step in (1, 2, 4, 5):
        _write(store_url, step, SHARDS)
    _write(store_url, 3, SHARDS, manifest=None)  # an interrupted save, older than the newest
    _write(store_url, 7, SHARDS, manifest=None)  # a save that may still be in progress
    manager._prune_store(newest_step=5)
    fs, root = fsspec.core.url_to_fs(store_url)
    fs.invalidate_cache()
    remaining = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    assert remaining == [step_tag(4), step_tag(5), step_tag(7)]
    assert [r.step for r in manager.complete_checkpoints()] == [4, 5]


def test_should_save_every_interval(tmp_path):
    manager = CheckpointManager(str(tmp_path), 1, 3, rank=0, world_size=1, staging_dir=tmp_path / "s")
    assert [s for s in range(0, 10) if manager.should_save(s)] == [3, 6, 9]


@pytest.mark.parametrize(
    "kwargs,field", [({"keep": 0}, "checkpoint.keep"), ({"interval_steps": 0}, "checkpoint.interval_steps")]
)
def test_bad_settings_name_the_field(tmp_path, kwargs, field):
    args = {"url": str(tmp_path), "keep": 2, "interval_steps": 10, **kwargs}
    with pytest.raises(JobError, match=field):
        CheckpointManager(args["url"], args["keep"], args["interval_steps"], rank=0, world_size=1)


def test_unknown_url_scheme_is_a_job_error(tmp_path):
    with pytest.raises(JobError, match="checkpoint url 'nosuchproto://x/y'"):
        CheckpointManager("nosuchproto://x/y", 2, 10, rank=0, world_size=1, staging_dir=tmp_path)


@pytest.mark.slow
def test_checkpoint_bench_tiny_runs_and_reports(tmp_path):
    """bench/checkpoint.py --tiny: real torchrun + DeepSpeed on CPU; the resumed state (plain and
    through the universal layout) equals the saved one, and the JSON carries the timings."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "bench/checkpoint.py", "--tiny", "--universal", "--out", str(tmp_path)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "RSS+ GiB/rank" in proc.stdout
    (result_file,) = tmp_path.glob("checkpoint-*-cpu-2.json")
    result = json.loads(result_file.read_text())
    assert result["gpus"] == 2 and result["zero_stage"] == 1 and result["checkpoint_bytes"] > 0
    for rank in result["ranks"]:
        assert rank["resume"]["state_equal"] and rank["universal"]["state_equal"]
        assert rank["save"]["local_write_s"] > 0 and rank["save"]["held_all_ranks_s"] >= rank["save"]["blocking_s"]
    assert result["summary"]["state_equal"] is True


def test_resume_from_a_chosen_checkpoint_by_hand(store_url, tmp_path):
    """`janus-job checkpoint resume-from` / `list`, the commands docs/operations.md gives."""
    from typer.testing import CliRunner

    from janus_job.cli import app

    runner = CliRunner()
    for step in (10, 20, 30):
        _write(store_url, step, SHARDS)
    refused = runner.invoke(app, ["checkpoint", "resume-from", store_url, "15"])
    assert isinstance(refused.exception, JobError) and "no complete checkpoint for step 15" in str(refused.exception)
    pinned = runner.invoke(app, ["checkpoint", "resume-from", store_url, "10"])
    assert pinned.exit_code == 0 and "retired: [20, 30]" in pinned.output
    manager = _manager(store_url, tmp_path)
    assert manager.latest().step == 10
    listed = runner.invoke(app, ["checkpoint", "list", store_url])
    assert listed.exit_code == 0
    assert [line.split()[0] for line in listed.output.splitlines()] == ["10"]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_each_rank_fetches_its_own_optimizer_shard(bf16):
    """Resume downloads a rank's shard on that rank only, also under bf16, where DeepSpeed prefixes
    the file name (names made by DeepSpeed's own engine methods)."""
    import types

    from deepspeed.runtime.engine import DeepSpeedEngine

    from janus_job.train.checkpoint import _rank_of_file

    namer = types.SimpleNamespace(
        _get_zero_ckpt_prefix=lambda dp, bf16_mode: DeepSpeedEngine._get_zero_ckpt_prefix(None, dp, bf16_mode)
    )
    for rank in (0, 3, 17):
        path = DeepSpeedEngine._get_rank_zero_ckpt_name(namer, "ckpt", "step-00000010", 0, rank, bf16)
        assert _rank_of_file(path.rsplit("/", 1)[-1]) == rank, path
    assert _rank_of_file("rng-rank-00017.pt") == 17
    assert _rank_of_file("mp_rank_00_model_states.pt") is None  # model states: local rank 0 of each node

"""bench/step.py in --tiny mode: real torchrun (2 CPU ranks, gloo), real DeepSpeed, tiny models.

The GPU numbers come from the device; this keeps the bench from rotting and checks that what it
reports is internally consistent (throughput from the measured time, memory spread from the
per-rank peaks, phase shares that add up, the janus config really being the spec's).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import step  # noqa: E402  (bench/step.py)


def run_bench(tmp_path: Path, *extra: str, env: dict | None = None) -> tuple[dict, str]:
    """bench/step.py --tiny; no wall-clock limit here: the bench's own watchdog ends a run that stops
    making progress (see step.py's docstring), however long a loaded machine needs for one that does."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "step.py"), "--tiny", "--out", str(out),
           "--run-dir", str(tmp_path / "run"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("tiny-step-*-cpu-2.json"))
    assert len(files) == 1, proc.stdout
    return json.loads(files[0].read_text()), proc.stdout


def leftover_processes(tmp_path: Path) -> list[int]:
    """Processes still running with this test's run folder on their command line."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if str(tmp_path) in " ".join(proc.info["cmdline"] or []):
            mine.append(proc.info["pid"])
    return mine


def test_synthetic_samples_follow_the_history_frame_rule():
    samples = step.synthetic_samples(2000, seed=3)
    counts = [len(s.frames) for s in samples]
    assert min(counts) == 1 and max(counts) == 9
    # steps 0..8 of a 20..80-step trajectory have 1..9 frames: 9 of ~50 steps on average
    nine = sum(c == 9 for c in counts) / len(counts)
    assert 0.78 < nine < 0.88
    assert len({s.id for s in samples}) == len(samples)


def test_synthetic_item_matches_the_batch_contract():
    from janus_job.data import frames
    from janus_job.data.dataset import JanusCollator

    geometry = frames.frame_geometry(640, 480)
    assert geometry.tokens_per_image == 391 and geometry.spatial_grid == (34, 46)
    setup = step.setups(4)["janus"]
    ids = step.TokenIds(image=7, vision_start=5, vision_end=6, text_low=20, text_high=500)
    samples = step.synthetic_samples(4, seed=1)
    dataset = step.SyntheticDataset(samples, setup, geometry, ids, spatial_channels=2048,
                                    vision_channels=1280, source_size=(640, 480))
    item = dataset[0]
    n = len(samples[0].frames)
    assert int((item["input_ids"] == 7).sum()) == 391 * n
    assert int((item["input_ids"] == 5).sum()) == n and int((item["input_ids"] == 6).sum()) == n
    assert int((item["labels"] != -100).sum()) == samples[0].answer_tokens
    assert item["vision_features"].shape == (n * 34 * 46, 1280)
    assert item["spatial_features"].shape == (34, 46, 2048)
    assert len(item["input_ids"]) == dataset.token_length(samples[0])
    batch = JanusCollator(0)([item])
    assert batch["images_per_sample"].tolist() == [n]


@pytest.mark.slow
def test_tiny_official_and_janus_side_by_side(tmp_path):
    report, stdout = run_bench(tmp_path, "--configs", "official,janus", "--steps", "1", "--warmup", "1",
                               "--profile-steps", "1", "--peak-tflops", "0.001")
    assert report["card"] == "cpu" and report["gpus"] == 2
    assert "samples/s/GPU" in stdout
    official, janus = report["official"], report["janus"]
    for r in (official, janus):
        assert r["status"] == "ok" and r["stalled"] is False
        assert r["world_size"] == 2 and r["global_batch_size"] == 2 * r["gradient_accumulation_steps"]
        expected = r["global_batch_size"] * r["steps_measured"] / r["measured_s"] / 2
        assert r["samples_per_s_per_gpu"] == pytest.approx(expected)
        assert r["s_per_step"] == pytest.approx(r["measured_s"])
        assert r["tokens_per_s_per_gpu"] > r["samples_per_s_per_gpu"]
        assert 1 <= r["images_per_sample"] <= 9
        peaks = r["peak_mem_gib_per_rank"]
        assert len(peaks) == 2 and min(peaks) > 0
        assert r["peak_mem_spread"] == pytest.approx((max(peaks) - min(peaks)) / max(peaks))
        mfu = 6 * r["trainable_params"] * r["tokens_per_s"] / (2 * 1e9)
        assert r["mfu"] == pytest.approx(mfu)
        for key in ("phase_shares", "phase_shares_synced"):
            shares = r[key]
            assert set(shares) == set(step.PHASES) | {"unattributed"}
            assert sum(shares.values()) == pytest.approx(1.0)
            assert -0.05 < shares["unattributed"] < 0.2  # host clock on CPU: little goes unseen
            assert shares["backward"] > 0 and shares["llm_forward"] > 0 and shares["data_wait"] > 0
        assert r["s_per_step_synced"] > 0
    # official runs both encoders in the step; janus reads both from the (in-memory) store
    assert official["zero_stage"] == 3 and official["sampler"] == "length_grouped"
    assert official["phase_shares"]["vggt"] > 0 and official["phase_shares"]["vision_tower"] > 0
    assert official["deepspeed_config"]["zero_optimization"]["stage3_max_reuse_distance"] == int(1e9)
    assert janus["phase_shares"]["vggt"] == 0 and janus["phase_shares"]["vision_tower"] == 0
    assert janus["sampler"] == "balanced" and janus["spatial_source"] == "cached"
    from janus_job.config.deepspeed import render_deepspeed_config

    shipped = render_deepspeed_config(step.janus_spec(2, tiny=True), 2)
    assert janus["zero_stage"] == shipped["zero_optimization"]["stage"]
    assert janus["deepspeed_config"]["zero_optimization"] == shipped["zero_optimization"]
    assert janus["gradient_accumulation_steps"] == shipped["gradient_accumulation_steps"]
    assert report["ratio"] == pytest.approx(janus["samples_per_s_per_gpu"] / official["samples_per_s_per_gpu"])


# Loaded by every Python process that has its folder on PYTHONPATH (the bench's ranks inherit it):
# wraps the trainer's micro-step so each call is recorded and its loss is scaled by SCALE.
STEP_HOOK = """
import json, os
import janus_job.train.engine as engine

original = engine.micro_step


def recorded(*args, **kwargs):
    output = original(*args, **kwargs)
    with open(os.environ["STEP_HOOK_LOG"], "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "loss": float(output.loss)}) + "\\n")
    output.loss = output.loss * float(os.environ["STEP_HOOK_SCALE"])
    return output


engine.micro_step = recorded
"""


@pytest.mark.slow
def test_the_bench_runs_the_trainers_step(tmp_path):
    """bench/step.py trains through janus_job.train.engine (build_engine, micro_step), the functions
    the trainer calls: a change to the trainer's micro-step shows in the bench's report."""
    import os

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STEP_HOOK)
    log = tmp_path / "steps.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
               STEP_HOOK_LOG=str(log), STEP_HOOK_SCALE="1000")
    report, _ = run_bench(tmp_path, "--configs", "official,janus", "--steps", "1", "--warmup", "0",
                          "--profile-steps", "0", env=env)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    start = 0
    for name in ("official", "janus"):  # the configs run one after the other
        r = report[name]
        assert r["status"] == "ok", (r.get("reason"), r.get("error_lines"))
        count = r["world_size"] * r["gradient_accumulation_steps"]  # one measured step, both ranks
        mine = calls[start:start + count]
        start += count
        assert len(mine) == count and len({c["pid"] for c in mine}) == 2
        # the bench reports the loss the trainer's micro-step returned: the hook's, scaled by 1000
        raw = sum(c["loss"] for c in mine) / count
        assert raw > 0 and r["mean_loss"] == pytest.approx(1000 * raw, rel=1e-5)
    assert start == len(calls)  # nothing else trained


@pytest.mark.slow
def test_watchdog_records_a_stall_with_every_ranks_stacks(tmp_path):
    """Rank 1 hangs in its first micro-step: the bench must not hang with it. The watchdog judges by
    progress (no rank's main thread moved for --budget-s), so a slow machine is not a stall."""
    report, stdout = run_bench(tmp_path, "--configs", "official", "--steps", "1", "--warmup", "0",
                               "--profile-steps", "0", "--budget-s", "6", "--grace-s", "4",
                               "--fault-hang-rank", "1")
    official = report["official"]
    assert "[step.py] official: stalled" in stdout
    assert official["config"] == "official"
    assert official["status"] == "stalled" and official["stalled"] is True
    assert "no rank made progress for > 6 s in a micro-step (phase measure step 0 micro 0)" in official["reason"]
    assert "no progress for" in official["stacks"]["rank1"] and "in micro_step" in official["stacks"]["rank1"]
    assert "no progress for" in official["stacks"]["rank0"]  # rank 0 waits in a collective and dumps too
    assert report["ratio"] is None
    assert leftover_processes(tmp_path) == []  # hung ranks and their loader workers are gone too


@pytest.mark.slow
def test_janusvln_exact_setup_stalls_and_the_bench_says_where(tmp_path):
    """official_inside: VGGT partitioned by ZeRO-3 and streamed per frame (docs/performance.md).

    Ranks with different frame counts in a micro-step issue different numbers of parameter
    all-gathers; the run must end as a stall (or gloo's collective-mismatch abort), never hang
    the bench, and the evidence must point at ZeRO-3's parameter fetch.
    """
    report, _ = run_bench(tmp_path, "--configs", "official_inside", "--steps", "1", "--warmup", "1",
                          "--budget-s", "15", "--grace-s", "4")
    r = report["official_inside"]
    assert r["status"] in ("stalled", "failed"), r.get("status")
    stacks = "\n".join(r["stacks"].values())
    errors = "\n".join(r["error_lines"])
    assert "fetch_sub_module" in stacks or "collective mismatch" in errors, (stacks[-3000:], errors)
    assert leftover_processes(tmp_path) == []


@pytest.mark.slow
def test_llm_probe_tiny_writes_every_variant(tmp_path):
    """bench/llm_probe.py (the language model's step alone) in its CPU mode."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "llm_probe.py"), "--tiny", "--iters", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = tmp_path.glob("tiny-*-llm-probe.json")
    result = json.loads(path.read_text())
    for name in ("ckpt_off_restricted_mb1", "ckpt_on_restricted_mb1", "ckpt_off_fulllogits_mb1"):
        assert result[name]["s_per_step"] > 0 and result[name]["samples_per_s"] > 0

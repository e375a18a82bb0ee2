"""The training loop: schedule, FLOP model, log line, and real runs of `janus-job train` (tiny model,
real DeepSpeed ZeRO-2 on CPU, a real feature store filled by the precompute code)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import JANUS_JOB

from janus_job.train.engine import lr_factor
from janus_job.train.metrics import BatchWork, ParamCounts, format_log_line, model_flops, peak_flops_per_device

LOG_LINE = re.compile(
    r"^train step=(?P<step>\d+)/(?P<total>\d+) s/it=(?P<s_per_it>[\d.]+) samples/s=(?P<samples>[\d.e+-]+) "
    r"tokens/s=(?P<tokens>[\d.]+[kMG]?) mfu=(?P<mfu>n/a|[\d.]+%) data_wait=(?P<wait>[\d.]+%) "
    r"mem_peak=(?P<peak>n/a|[\d.]+GiB) mem_min=(?P<min>n/a|[\d.]+GiB) mem_max=(?P<max>n/a|[\d.]+GiB) "
    r"loss=(?P<loss>[-\d.]+) lr=(?P<lr>[\d.]+e[-+]\d+) eta=(?P<eta>\d+h\d\dm|\d+m\d\ds|n/a)$"
)
RECORD_FIELDS = {"step", "total_steps", "s_per_it", "samples_per_s", "tokens_per_s", "mfu", "data_wait",
                 "mem_peak_gib", "mem_min_gib", "mem_max_gib", "loss", "lr", "eta_s"}


# ---------------------------------------------------------------- pure parts


def test_schedule_warms_up_then_decays():
    total, warmup = 100, 10
    cosine = [lr_factor(s, total, warmup, "cosine") for s in range(total)]
    assert cosine[0] == 0.0  # transformers' get_scheduler: lr 0 at optimizer step 0
    assert cosine[5] == pytest.approx(0.5)
    assert all(a < b for a, b in zip(cosine[:10], cosine[1:11]))
    assert cosine[10] == 1.0
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    assert cosine[55] == pytest.approx(0.5)
    assert lr_factor(total, total, warmup, "cosine") == pytest.approx(0.0)
    assert lr_factor(55, total, warmup, "linear") == pytest.approx(0.5)
    assert lr_factor(99, total, warmup, "constant") == 1.0


def test_flop_model_counts_each_part_once():
    params = ParamCounts(llm_body=1000, lm_head=100, mergers=10, vision_blocks=50, vggt=70)
    work = BatchWork(samples=2, tokens=300, label_tokens=4, image_tokens=200, spatial_tokens=60,
                     vision_patches=800, vggt_patches=900)
    expected = 6 * 1000 * 300 + 6 * 100 * 4 + 6 * 10 * 260 / 2 + 2 * 50 * 800 + 2 * 70 * 900
    assert model_flops(work, params) == pytest.approx(expected)
    # the floor for the official geometry: 6 x 7.66e9 x 3,777 = 173 TFLOP per sample
    full = ParamCounts(llm_body=7_660_000_000, lm_head=0, mergers=0, vision_blocks=0, vggt=0)
    assert model_flops(BatchWork(tokens=3777), full) == pytest.approx(173.6e12, rel=1e-3)


def test_peak_flops_table_and_override():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", {}) == pytest.approx(989.4e12)
    assert peak_flops_per_device("NVIDIA H100 PCIe", {}) == pytest.approx(756e12)
    assert peak_flops_per_device("NVIDIA H200", {}) == pytest.approx(989.4e12)
    assert peak_flops_per_device(None, {}) is None
    assert peak_flops_per_device(None, {"JANUS_PEAK_TFLOPS": "2.5"}) == pytest.approx(2.5e12)


def test_log_line_has_every_field_and_parses():
    record = {"step": 120, "total_steps": 5000, "s_per_it": 3.02, "samples_per_s": 10.6, "tokens_per_s": 40100.0,
              "mfu": 0.382, "data_wait": 0.012, "mem_peak_gib": 61.3, "mem_min_gib": 58.0, "mem_max_gib": 63.1,
              "loss": 1.234, "lr": 1.9e-5, "eta_s": 4 * 3600 + 5 * 60}
    line = format_log_line(record)
    assert line == ("train step=120/5000 s/it=3.02 samples/s=10.6 tokens/s=40.1k mfu=38.2% data_wait=1.2% "
                    "mem_peak=61.3GiB mem_min=58.0GiB mem_max=63.1GiB loss=1.2340 lr=1.90e-05 eta=4h05m")
    assert LOG_LINE.match(line)
    cpu = dict(record, mfu=None, mem_peak_gib=None, mem_min_gib=None, mem_max_gib=None, eta_s=75)
    assert LOG_LINE.match(format_log_line(cpu)).group("mfu", "peak", "eta") == ("n/a", "n/a", "1m15s")


# ---------------------------------------------------------------- real runs


def subprocess_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "JANUS_STATS_DIR"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def janus_job(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [*JANUS_JOB, *args]
    return subprocess.run(command, capture_output=True, text=True, env=subprocess_env(env), timeout=timeout)


def edit_spec(spec_path: Path, target: Path, change) -> Path:
    spec = yaml.safe_load(spec_path.read_text())
    change(spec)
    target.write_text(yaml.safe_dump(spec))
    return target


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """A tiny job whose store is complete: synthetic data, tiny models, precomputed features."""
    from janus_job.demo.run import precompute_features, prepare_job

    root = tmp_path_factory.mktemp("train-job")
    spec_path = prepare_job(root, steps=3, gpu=False)
    precompute_features(spec_path)
    return spec_path


@pytest.mark.slow
def test_training_prints_the_log_line_and_writes_the_same_fields_as_json(job, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    result = janus_job("train", "--spec", str(job), env={"JANUS_METRICS_FILE": str(metrics)})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [LOG_LINE.match(line) for line in result.stdout.splitlines() if line.startswith("train step=")]
    assert [m and int(m["step"]) for m in lines] == [1, 2, 3], result.stdout
    assert "train start" in result.stdout and "accum=2 global_batch=4" in result.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record, line in zip(steps, lines):
        assert RECORD_FIELDS <= set(record)
        assert format_log_line(record) == line.group(0)
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert record["samples_per_s"] > 0 and record["tokens_per_s"] > 0
    # warmup_ratio 0.2 of 3 steps = 1 warmup step, then cosine: lr trained with at steps 1..3
    assert [r["lr"] for r in steps] == pytest.approx([1e-3 * f for f in (0.0, 1.0, 0.5)])
    assert records[-1]["event"] == "done" and records[-1]["param_norm"] > 0


def delete_spatial_features(spec_path: Path, count: int) -> None:
    store = Path(yaml.safe_load(spec_path.read_text())["features"]["store"])
    objects = sorted((store / "spatial").rglob("*.jnsf"))
    assert len(objects) > count
    for path in objects[:count]:
        path.unlink()


@pytest.mark.slow
def test_incomplete_store_fails_fast_with_the_missing_count(job, tmp_path):
    copy = tmp_path / "job"
    shutil.copytree(job.parent, copy, ignore=shutil.ignore_patterns("checkpoints"))
    spec = edit_spec(copy / "job.yaml", copy / "job.yaml",
                     lambda s: s["features"].update(store=str(copy / "store")))
    delete_spatial_features(spec, 2)
    result = janus_job("train", "--spec", str(spec))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "2 of 24 samples have no precomputed features" in result.stderr
    assert "rerun `janus-job precompute" in result.stderr
    assert "train start" not in result.stdout  # refused before the model was built


@pytest.mark.slow
def test_store_without_completion_marker_times_out_with_a_clear_message(job, tmp_path):
    spec = edit_spec(job, tmp_path / "job.yaml",
                     lambda s: s["features"].update(store=str(tmp_path / "empty-store")))
    result = janus_job("train", "--spec", str(spec), env={"JANUS_PRECOMPUTE_WAIT_S": "1"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "did not finish within 1s" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("frame, workers", [("000", 0), ("002", 1)])
def test_unreadable_frame_is_reported_by_sample_id(job, tmp_path, frame, workers):
    """Read in the main process (num_workers 0) and in a DataLoader worker (num_workers 1)."""
    copy = tmp_path / "job"
    shutil.copytree(job.parent, copy, ignore=shutil.ignore_patterns("checkpoints", "store"))

    def change(spec):
        spec["data"].update(image_root=str(copy / "data" / "images"), num_workers=workers)
        spec["features"]["cache_vision"] = False  # the vision tower runs online: frames are read
        spec["training"]["checkpoint"]["url"] = str(copy / "checkpoints")

    spec = edit_spec(copy / "job.yaml", copy / "job.yaml", change)
    (copy / "data" / "images" / "ep001" / f"{frame}.jpg").write_bytes(b"not a jpeg")
    result = janus_job("train", "--spec", str(spec))
    assert result.returncode == 2, result.stdout + result.stderr
    error = result.stderr.strip().splitlines()[-1]
    # a frame changed after precompute is refused at start, before the loader reads it (the trainer re-hashes
    # up to 64 frames against the store's frame index); otherwise the loader names the sample
    assert (re.search(rf"sample ep001/\d{{3}}\.jpg: frame ep001/{frame}\.jpg", error)
            or re.search(rf"does not match the frames .*frame ep001/{frame}\.jpg", error)), result.stderr
    assert "Traceback" not in error


def sample_trace(path_template: Path) -> list[tuple[int, int, tuple[str, ...]]]:
    trace = [json.loads(line) for line in Path(str(path_template).replace("{rank}", "0")).read_text().splitlines()]
    return [(r["step"], r["micro_step"], tuple(r["sample_ids"])) for r in trace]


@pytest.mark.slow
def test_a_run_resumed_from_its_checkpoint_trains_what_an_uninterrupted_run_trains(job, tmp_path):
    """The loop's checkpoint hooks: sampler position, step, optimizer and schedule come back. The
    run crosses an epoch boundary with the loader and the batch prefetch reading ahead of training."""

    def variant(name: str, steps: int) -> Path:
        def change(spec):
            spec["training"].update(max_steps=steps, warmup_ratio=0.0, scheduler="linear")
            spec["training"]["checkpoint"].update(url=str(tmp_path / name / "checkpoints"), interval_steps=2, keep=3)
            spec["data"]["prefetch_batches"] = 3
        (tmp_path / name).mkdir(exist_ok=True)
        return edit_spec(job, tmp_path / name / f"job-{steps}.yaml", change)

    trace = {"JANUS_SAMPLE_TRACE": str(tmp_path / "split-{rank}.jsonl"),
             "JANUS_CHECKPOINT_STAGING": str(tmp_path / "staging")}
    # an uninterrupted 8-step run (24 samples, global batch 4: epoch 1 starts at step 7; checkpoints
    # at steps 2, 4, 6, 8) ...
    whole = janus_job("train", "--spec", str(variant("split", 8)), env=trace)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    trace_path = tmp_path / "split-0.jsonl"
    shutil.copy(trace_path, tmp_path / "whole-0.jsonl")
    trained = sample_trace(tmp_path / "whole-{rank}.jsonl")
    epoch0 = [i for step, _, ids in trained if step < 6 for i in ids]
    epoch1 = [i for step, _, ids in trained if step >= 6 for i in ids]
    assert len(epoch0) == len(set(epoch0)) == 24  # every sample once
    assert len(epoch1) == len(set(epoch1)) == 8  # a new epoch's first two steps, not the rest of the old one
    # ... becomes one that died after its step-4 checkpoint: later checkpoints and trace lines go
    for step in (6, 8):
        shutil.rmtree(tmp_path / "split" / "checkpoints" / f"step-{step:08d}")
    kept = [line for line in trace_path.read_text().splitlines() if json.loads(line)["step"] < 4]
    trace_path.write_text("".join(line + "\n" for line in kept))
    resumed = janus_job("train", "--spec", str(variant("split", 8)), env=trace)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "at step 4" in resumed.stdout
    assert [m[0] for m in re.findall(r"^train step=(\d+)/8", resumed.stdout, re.M)] == ["5", "6", "7", "8"]
    assert sample_trace(tmp_path / "split-{rank}.jsonl") == trained

    def last_line(out: str) -> re.Match:
        return [LOG_LINE.match(line) for line in out.splitlines() if line.startswith("train step=8/8")][0]

    assert last_line(resumed.stdout)["lr"] == last_line(whole.stdout)["lr"]
    assert float(last_line(resumed.stdout)["loss"]) == pytest.approx(float(last_line(whole.stdout)["loss"]), rel=1e-5)


@pytest.mark.slow
def test_read_through_fills_an_empty_store_then_trains(job, tmp_path):
    store = tmp_path / "store"
    spec = edit_spec(job, tmp_path / "job.yaml", lambda s: (
        s["features"].update(store=str(store), mode="read_through"),
        s["training"].update(max_steps=2),
        s["training"]["checkpoint"].update(url=str(tmp_path / "checkpoints")),
    ))
    result = janus_job("train", "--spec", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "precompute worker 0/1: 24 spatial objects to compute, 0 already stored" in result.stdout
    assert len(list(store.glob("markers/*/COMPLETE.json"))) == 1
    assert [int(m) for m in re.findall(r"^train step=(\d+)/2 ", result.stdout, re.M)] == [1, 2]
    again = janus_job("train", "--spec", str(spec))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 spatial objects to compute, 24 already stored" in again.stdout


@pytest.mark.slow
def test_store_of_other_vggt_weights_is_refused(job, tmp_path):
    """Same geometry, other weights: the trainer names model.vggt instead of training on stale features."""
    import torch
    from safetensors.torch import load_file, save_file

    spec = yaml.safe_load(job.read_text())
    weights = load_file(spec["model"]["vggt"])
    name = sorted(weights)[0]
    weights[name] = weights[name] + torch.ones_like(weights[name])
    other = tmp_path / "vggt-other.safetensors"
    save_file(weights, str(other))
    edited = edit_spec(job, tmp_path / "job.yaml", lambda s: s["model"].update(vggt=str(other)))
    result = janus_job("train", "--spec", str(edited))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model.vggt" in result.stderr
    assert "is not the VGGT checkpoint features.store was precomputed with" in result.stderr
    assert "train start" not in result.stdout


@pytest.mark.slow
def test_store_of_other_vision_tower_weights_is_refused(job, tmp_path):
    """Cached vision features of another Qwen vision tower (same architecture) are refused by name;
    a change outside the frozen tower (the LLM, the trainable merger) is not a reason to refuse."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    spec = yaml.safe_load(job.read_text())
    assert spec["features"].get("cache_vision", True)

    def qwen_copy(name: str, key_filter) -> Path:
        target = tmp_path / name
        shutil.copytree(spec["model"]["qwen"], target)
        (weights_file,) = target.glob("*.safetensors")
        weights = load_file(str(weights_file))
        key = sorted(k for k in weights if key_filter(k))[0]
        weights[key] = weights[key] + torch.ones_like(weights[key])
        save_file(weights, str(weights_file), metadata={"format": "pt"})
        return target

    frozen = qwen_copy("qwen-other-vision", lambda k: "visual." in k and "merger" not in k)
    edited = edit_spec(job, tmp_path / "job.yaml", lambda s: s["model"].update(qwen=str(frozen)))
    result = janus_job("train", "--spec", str(edited))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model.qwen" in result.stderr and "is not the one features.store was precomputed with" in result.stderr
    assert "train start" not in result.stdout

    merger = qwen_copy("qwen-other-merger", lambda k: "visual.merger" in k)
    edited = edit_spec(job, tmp_path / "job2.yaml", lambda s: s["model"].update(qwen=str(merger)))
    result = janus_job("train", "--spec", str(edited))
    assert result.returncode == 0, result.stdout + result.stderr

"""Precompute with checkpoints of the tiny flavor on disk (the same loading path as VGGT-1B and Qwen2.5-VL-7B):
exact cached values on file:// and S3, sharding and the final marker, a SIGKILLed run resumed without
recomputation, fingerprint refusal, verify, estimate."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_scaled
from PIL import Image

from janus_job.config.load import load_spec
from janus_job.data import frames as frame_ops
from janus_job.data.annotations import build_vlnce, load_annotations, write_annotations
from janus_job.demo.run import write_tiny_models
from janus_job.errors import JobError
from janus_job.features.encoders import load_encoders
from janus_job.features.precompute import finalize, run_pod, run_worker
from janus_job.features.store import FeatureStore, StoreFeatureSource, decode_tensor

REPO = Path(__file__).resolve().parents[1]
EPISODE_LENGTHS = {"3": 12, "8": 5, "11": 3}  # 20 samples, 20 distinct frames
FRAME_WIDTH = 112  # the tiny flavor's frame width; the test frames are 112x84


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[int, tuple[Path, Path]]:
    """Tiny-flavor checkpoints (Qwen directory, self-describing VGGT file) by seed, written once."""
    root = tmp_path_factory.mktemp("models")
    return {seed: write_tiny_models(root / f"seed{seed}", seed=seed) for seed in (1234, 99)}


@pytest.fixture(autouse=True)
def _models(tiny_models):
    global MODELS
    MODELS = tiny_models


def make_dataset(root: Path) -> tuple[Path, Path]:
    """Trajectory folders of random 112x84 PNGs (VLN-CE layout) and their annotation file."""
    images = root / "images"
    rng = np.random.default_rng(0)
    for episode, length in EPISODE_LENGTHS.items():
        folder = images / "R2R" / episode
        folder.mkdir(parents=True)
        for i in range(length):
            action = "stop" if i == length - 1 else "move_forward"
            pixels = rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"rgb_{i:04d}_{action}.png")
    episodes = {
        "episodes": [{"episode_id": int(e), "instruction": {"instruction_text": "go"}} for e in EPISODE_LENGTHS]
    }
    (root / "episodes.json").write_text(json.dumps(episodes))
    annotations = root / "train.json"
    write_annotations(build_vlnce(root / "episodes.json", images / "R2R", images), annotations)
    return annotations, images


def write_spec(
    root: Path,
    store: str,
    *,
    pods: int = 1,
    gpus: int = 1,
    batch: int = 4,
    vision: bool = True,
    endpoint: str | None = None,
    seed: int = 1234,
    frame_width: int = FRAME_WIDTH,
) -> Path:
    annotations, images = (
        make_dataset(root) if not (root / "train.json").exists() else (root / "train.json", root / "images")
    )
    features = {"store": store, "cache_vision": vision, "cache_size_gib": 0}
    if endpoint:
        features |= {"endpoint_url": endpoint, "credentials_secret": "s3-creds"}
    spec = {
        "name": "pc-test",
        "model": {"qwen": str(MODELS[seed][0]), "vggt": str(MODELS[seed][1])},
        # min_pixels: the 112x84 test frames stay unresized by the Qwen processor
        "data": {
            "annotations": str(annotations),
            "image_root": str(images),
            "frame_width": frame_width,
            "min_pixels": 4 * 28 * 28,
        },
        "features": features,
        "precompute": {"pods": pods, "gpus_per_pod": gpus, "batch_size": batch},
        "training": {"checkpoint": {"url": str(root / "ckpt")}},
    }
    path = root / f"job-{pods}x{gpus}-{seed}-{frame_width}.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def expected_features(sample, encoders):
    decoded = [
        frame_ops.preprocess_for_vggt(frame_ops.load_frame(p), encoders.target_width) for p in sample.frame_paths
    ]
    spatial = encoders.spatial(torch.stack(decoded)[None])[0].to(torch.bfloat16)
    vision = [t.to(torch.bfloat16) for t in encoders.vision(decoded)]
    return spatial, vision


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.fixture(params=["file", "s3"])
def job(request, tmp_path):
    if request.param == "file":
        return load_spec(write_spec(tmp_path, f"file://{tmp_path}/store"))
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return load_spec(write_spec(tmp_path, f"s3://{bucket}/features", endpoint=endpoint))


def test_precomputed_sample_equals_the_function_bit_exactly(job, capsys):
    encoders = load_encoders(job, "cpu")
    report = run_worker(job, encoders, worker=0, workers=1, progress_interval_s=0)
    assert (report.computed_spatial, report.computed_vision) == (20, 20)
    assert "samples/s" in capsys.readouterr().out and finalize(job, encoders.fingerprints(), 1) is not None

    store = FeatureStore.from_spec(job)
    store.open(encoders.fingerprints(), create=False)
    annotations = load_annotations(job.data.annotations, job.data.image_root)
    index = store.frame_index(annotations.digest)
    assert store.missing(annotations.samples, index, vision=True) == []
    source = StoreFeatureSource(store, frame_hashes=index)
    for sample in (annotations.samples[0], annotations.samples[11], annotations.samples[15]):
        spatial, vision = expected_features(sample, encoders)
        assert spatial.shape == (6, 8, 64)  # tiny VGGT: 2 x 32 channels on the 6x8 grid
        assert same_bits(source.get_spatial(sample), spatial)
        for image, frame_vision in zip(sample.images, vision):
            assert same_bits(source.get_vision(image), frame_vision)

    rerun = run_worker(job, encoders, worker=0, workers=1)  # idempotent: nothing recomputed
    assert (rerun.computed_spatial, rerun.skipped_spatial, rerun.computed_vision) == (0, 20, 0)


def test_shards_cover_everything_and_the_last_pod_writes_the_final_marker(tmp_path):
    job = load_spec(write_spec(tmp_path, str(tmp_path / "store"), pods=2, batch=3))
    assert run_pod(job, "unused", index=1)[0].samples == 10
    store = FeatureStore.from_spec(job)
    annotations = load_annotations(job.data.annotations, job.data.image_root)
    assert store.completion(annotations.digest) is None
    with pytest.raises(JobError, match="did not finish within"):
        store.wait_complete(annotations.digest, timeout_s=0.1, poll_s=0.05)
    reports = run_pod(job, "unused", index=0)
    record = store.wait_complete(annotations.digest, timeout_s=1)
    assert record["samples"] == 20 and record["workers"] == 2
    assert len(store.list_keys("spatial")) == 20 and len(store.list_keys("vision")) == 20
    with pytest.raises(JobError, match="outside precompute.pods=2"):
        run_pod(job, "unused", index=2)
    assert reports[0].worker == 0


def test_store_of_other_weights_is_refused(tmp_path):
    store = str(tmp_path / "store")
    job = load_spec(write_spec(tmp_path, store))
    run_worker(job, load_encoders(job, "cpu", vision=False), worker=0, workers=1)
    other_weights = load_spec(write_spec(tmp_path, store, seed=99))
    with pytest.raises(JobError, match=r"different spatial function \(weights_sha256: store has"):
        run_worker(other_weights, load_encoders(other_weights, "cpu", vision=False), worker=0, workers=1)
    other_width = load_spec(write_spec(tmp_path, store, frame_width=140))
    with pytest.raises(JobError, match="target_width"):
        run_worker(other_width, load_encoders(other_width, "cpu", vision=False), worker=0, workers=1)


def _janus_job(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "janus_job.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_killed_precompute_resumes_without_recomputing(tmp_path):
    spec = write_spec(tmp_path, f"file://{tmp_path}/store", batch=1)
    store = FeatureStore(str(tmp_path / "store"))
    first = _janus_job("precompute", "--spec", str(spec), "--pace-s", "0.4", "--progress-interval", "0")
    deadline = time.monotonic() + load_scaled(120)  # a hung run that never writes
    while len(store.list_keys("spatial")) < 4:
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = set(store.list_keys("spatial"))
    assert 4 <= len(done_before) < 20 and store.list_keys("vision") == []
    for key in done_before:  # whatever is visible after the kill is whole
        decode_tensor(store.get_bytes(key), key)
    annotations = load_annotations(tmp_path / "train.json", tmp_path / "images")
    assert store.completion(annotations.digest) is None

    report = tmp_path / "report.json"
    second = _janus_job("precompute", "--spec", str(spec), "--report", str(report))
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    (worker,) = json.loads(report.read_text())
    assert worker["computed_spatial"] == 20 - len(done_before)  # nothing finished is redone
    assert worker["skipped_spatial"] == len(done_before)
    assert worker["computed_vision"] == 20

    keys = store.list_keys("spatial")
    assert set(keys) >= done_before and len(keys) == 20  # content keys: no duplicates possible
    assert store.temp_files() == []  # the killed writer's temp file was cleaned up
    for key in keys + store.list_keys("vision"):
        decode_tensor(store.get_bytes(key), key)
    assert store.completion(annotations.digest)["samples"] == 20


@pytest.mark.slow
def test_pod_runs_one_worker_process_per_gpu(tmp_path):
    spec = write_spec(tmp_path, str(tmp_path / "store"), gpus=2, vision=False)
    proc = _janus_job("precompute", "--spec", str(spec), "--index", "0")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "precompute worker 0/2" in output and "precompute worker 1/2" in output
    assert "wrote markers/" in output
    assert len(FeatureStore(str(tmp_path / "store")).list_keys("spatial")) == 20


def test_verify_and_estimate_commands(tmp_path):
    from typer.testing import CliRunner

    from janus_job.cli import app

    spec = write_spec(tmp_path, str(tmp_path / "store"))
    job = load_spec(spec)
    runner = CliRunner()
    result = runner.invoke(app, ["features", "verify", "--spec", str(spec)])
    assert isinstance(result.exception, JobError) and "no spatial or vision manifest" in str(result.exception)

    run_pod(job, str(spec), index=0)
    result = runner.invoke(app, ["features", "verify", "--spec", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["missing_samples"] == 0 and report["objects"] == {"spatial": 20, "vision": 20}
    assert report["complete_marker"] and report["corrupt"] == []

    store = FeatureStore(str(tmp_path / "store"))
    victim = store.list_keys("vision")[3]
    path = tmp_path / "store" / victim
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    result = runner.invoke(app, ["features", "verify", "--spec", str(spec)])
    assert isinstance(result.exception, JobError) and "1 corrupt objects" in str(result.exception)
    assert victim in result.output

    result = runner.invoke(app, ["features", "estimate", "--spec", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    estimate = json.loads(result.output)
    geometry = frame_ops.frame_geometry(112, 84, FRAME_WIDTH)
    spatial_each = geometry.spatial_grid[0] * geometry.spatial_grid[1] * 2048 * 2 + 200
    assert estimate["samples"] == 20 and estimate["unique_frames"] == 20
    assert estimate["samples_by_frames"] == {"1": 3, "2": 3, "3": 3, "4": 2, "5": 2, "6": 1, "7": 1, "8": 1, "9": 4}
    assert estimate["spatial_bytes"] == 20 * spatial_each
    assert estimate["spatial_gpu_hours"] == pytest.approx(
        sum(count * 0.323 * int(n) / 9 for n, count in estimate["samples_by_frames"].items()) / 3600
    )


def test_encoders_load_from_checkpoint_files(tmp_path):
    """The real loading path (a self-describing VGGT safetensors file, a Qwen2.5-VL directory) with
    tiny-flavor checkpoints; the fingerprint hashes exactly the loaded weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from janus_job.demo.tiny import tiny_image_processor, tiny_qwen_config, tiny_tokenizer
    from janus_job.features.encoders import frozen_visual_digest, load_encoders, load_qwen_visual
    from janus_job.features.store import state_dict_digest
    from janus_job.models.janusvln.model import vision_tower_features
    from janus_job.models.vggt import FrameCausalAggregator, VGGTAggregatorConfig, save_aggregator

    torch.manual_seed(5)
    aggregator = FrameCausalAggregator(VGGTAggregatorConfig.tiny())
    save_aggregator(aggregator, tmp_path / "vggt.safetensors")
    qwen_dir = tmp_path / "qwen"
    Qwen2_5_VLForConditionalGeneration(tiny_qwen_config()).save_pretrained(qwen_dir)
    tiny_tokenizer().save_pretrained(qwen_dir)
    tiny_image_processor().save_pretrained(qwen_dir)

    spec_path = write_spec(tmp_path, str(tmp_path / "store"))
    spec = json.loads(spec_path.read_text())
    spec["model"] = {"qwen": str(qwen_dir), "vggt": str(tmp_path / "vggt.safetensors")}
    spec_path.write_text(json.dumps(spec))
    job = load_spec(spec_path)

    encoders = load_encoders(job, "cpu")
    assert encoders.spatial_fingerprint.fields["architecture"] == VGGTAggregatorConfig.tiny().to_dict()
    assert encoders.spatial_fingerprint.fields["weights_sha256"] == state_dict_digest(aggregator.state_dict())
    visual, _, digest = load_qwen_visual(str(qwen_dir), "cpu", torch.float32)
    saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_dir).model.visual
    assert all(torch.equal(visual.state_dict()[k], v) for k, v in saved.state_dict().items())
    # the vision digest names the checkpoint's tensors, whatever dtype the tower runs in
    assert encoders.vision_fingerprint.fields["weights_sha256"] == digest
    assert load_qwen_visual(str(qwen_dir), "cpu", torch.bfloat16)[2] == digest
    assert digest == frozen_visual_digest(saved.state_dict())

    report = run_worker(job, encoders, worker=0, workers=1)
    assert (report.computed_spatial, report.computed_vision) == (20, 20)
    store = FeatureStore.from_spec(job)
    store.open(encoders.fingerprints(), create=False)
    annotations = load_annotations(job.data.annotations, job.data.image_root)
    source = StoreFeatureSource(store, frame_hashes=store.frame_index(annotations.digest))
    sample = annotations.samples[-1]
    spatial, vision = expected_features(sample, encoders)
    assert same_bits(source.get_spatial(sample), spatial)
    frame = frame_ops.preprocess_for_vggt(frame_ops.load_frame(sample.frame_paths[-1]), 112)
    out = tiny_image_processor()(images=[frame], return_tensors="pt", do_rescale=False)
    direct = vision_tower_features(visual, out["pixel_values"], out["image_grid_thw"])[0].to(torch.bfloat16)
    assert same_bits(source.get_vision(sample.images[-1]), direct)

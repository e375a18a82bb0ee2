"""Feature store: bit-exact round trips on file:// and a real S3-protocol server, checksums,
fingerprint refusal, clear transport errors, the local cache and read-through write-back."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import load_scaled

from janus_job.data.annotations import Sample
from janus_job.errors import JobError
from janus_job.features.store import (
    FeatureStore,
    Fingerprint,
    LocalCache,
    StoreFeatureSource,
    decode_tensor,
    encode_tensor,
    sha256_file,
    state_dict_digest,
)

SPATIAL = Fingerprint("spatial", {"weights": "a" * 64, "geometry": [490, 644], "layer": 22, "dtype": "bfloat16"})
VISION = Fingerprint("vision", {"weights": "b" * 64, "geometry": [476, 644], "dtype": "bfloat16"})


def random_bf16(*shape: int, seed: int = 0) -> torch.Tensor:
    """Every bit pattern is possible, NaN payloads and infinities included."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, shape, dtype=torch.int32, generator=gen).to(torch.int16)
    return bits.view(torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return FeatureStore(f"file://{tmp_path}/store")
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return FeatureStore(f"s3://{bucket}/features", endpoint_url=endpoint)


def test_round_trip_is_bit_exact(store):
    store.open([SPATIAL, VISION], create=True)
    spatial = random_bf16(34, 46, 2048, seed=1)  # the official 6.4 MB object
    vision = random_bf16(1564, 1280, seed=2)
    k_spatial = store.spatial_key(["f0", "f1", "f2"])
    k_vision = store.vision_key("f2")
    store.put_tensor(k_spatial, spatial)
    store.put_tensor(k_vision, vision)
    assert same_bits(store.get_tensor(k_spatial), spatial)
    assert same_bits(store.get_tensor(k_vision), vision)
    assert store.get_tensor(store.spatial_key(["f0", "f1"])) is None
    assert store.list_keys("spatial") == [k_spatial]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_encoding_keeps_dtype_and_shape(dtype):
    tensor = (torch.randn(3, 5) * 100).to(dtype)
    assert torch.equal(decode_tensor(encode_tensor(tensor), "k"), tensor)


def test_keys_depend_on_frames_order_and_fingerprint():
    store = FeatureStore("/nonexistent-unused")
    store._fingerprints = {"spatial": SPATIAL, "vision": VISION}
    base = store.spatial_key(["a", "b"])
    assert base != store.spatial_key(["b", "a"])
    assert base != store.spatial_key(["a", "b", "b"])
    other = Fingerprint("spatial", {**SPATIAL.fields, "layer": 21})
    store._fingerprints["spatial"] = other
    assert base != store.spatial_key(["a", "b"])


def test_corrupted_object_is_detected_by_checksum(store, tmp_path):
    store.open([SPATIAL], create=True)
    key = store.spatial_key(["x"])
    store.put_tensor(key, random_bf16(4, 6, 2048))
    blob = bytearray(store.get_bytes(key))
    blob[-100] ^= 0x01  # one bit in the payload
    store.put_bytes(key, bytes(blob))
    with pytest.raises(JobError, match=f"{key}.*checksum mismatch"):
        store.get_tensor(key)
    store.put_bytes(key, bytes(blob[:-10]))  # truncated
    with pytest.raises(JobError, match=f"{key}.*corrupt"):
        store.get_tensor(key)
    assert store.verify().corrupt == [key]


def test_different_fingerprint_is_refused(store):
    store.open([SPATIAL], create=True)
    other_weights = Fingerprint("spatial", {**SPATIAL.fields, "weights": "c" * 64})
    with pytest.raises(JobError, match=r"different spatial function \(weights: store has 'aaa"):
        store.open([other_weights], create=True)
    other_geometry = Fingerprint("spatial", {**SPATIAL.fields, "geometry": [518, 518]})
    with pytest.raises(JobError, match="geometry"):
        store.open([other_geometry], create=False)
    store.open([SPATIAL], create=False)  # the same function opens fine


def test_opening_without_manifest_for_reading_is_refused(tmp_path):
    store = FeatureStore(str(tmp_path / "empty"))
    with pytest.raises(JobError, match="no spatial features .* run `janus-job precompute"):
        store.open([SPATIAL], create=False)


def test_state_dict_digest_sees_every_bit():
    weights = {"a.weight": torch.randn(4, 4), "b.bias": torch.zeros(3)}
    digest = state_dict_digest(weights)
    assert digest == state_dict_digest(dict(reversed(list(weights.items()))))
    flipped = weights["a.weight"].clone()
    flipped.view(torch.int32)[0, 0] ^= 1
    assert digest != state_dict_digest({**weights, "a.weight": flipped})
    assert digest != state_dict_digest({k: v.to(torch.bfloat16) for k, v in weights.items()})


def test_missing_credentials_is_a_clear_error(monkeypatch, s3_server):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = FeatureStore("s3://bucket/prefix", endpoint_url=s3_server)
    start = time.monotonic()
    with pytest.raises(JobError, match="no S3 credentials .*AWS_ACCESS_KEY_ID.*credentials_secret"):
        store.check_reachable()
    assert time.monotonic() - start < load_scaled(10)  # no retry storm against a missing credential


def test_unreachable_endpoint_fails_fast(s3_env):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = FeatureStore("s3://bucket/prefix", endpoint_url=f"http://127.0.0.1:{port}", connect_timeout_s=1)
    start = time.monotonic()
    with pytest.raises(JobError, match=f"127.0.0.1:{port}.*reachable"):
        store.check_reachable()
    with pytest.raises(JobError, match="reachable"):
        store.get_tensor("spatial/aa/missing.jnsf")
    assert time.monotonic() - start < load_scaled(30)  # connect timeout 1 s, a bounded number of tries


def test_missing_bucket_is_named(s3_server, s3_env):
    store = FeatureStore("s3://no-such-bucket/prefix", endpoint_url=s3_server)
    with pytest.raises(JobError, match="no-such-bucket"):
        store.check_reachable()


def _write_same_key(url: str, endpoint: str | None, env: dict, seed: int) -> None:
    os.environ.update(env)
    store = FeatureStore(url, endpoint_url=endpoint)
    store.open([SPATIAL], create=True)
    for _ in range(5):
        store.put_tensor(store.spatial_key(["same"]), random_bf16(8, 8, 2048, seed=seed))


def test_concurrent_writers_of_one_key_leave_a_valid_object(store):
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_same_key, args=(store.url, store.endpoint_url, env, 7)) for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    store.open([SPATIAL], create=False)
    assert same_bits(store.get_tensor(store.spatial_key(["same"])), random_bf16(8, 8, 2048, seed=7))
    assert store.list_keys("spatial") == [store.spatial_key(["same"])]
    assert store.temp_files() == []


def _fill_cache(root: str, limit: int, worker: int) -> None:
    cache = LocalCache(root, limit)
    for i in range(20):
        key = f"spatial/{worker:02d}/{i}.jnsf"
        cache.put(key, encode_tensor(random_bf16(64, 64, seed=worker * 100 + i)))
        blob = cache.get(key)
        if blob is not None:  # another process may already have evicted it
            decode_tensor(blob, key)


def test_local_cache_stays_under_its_limit_with_several_processes(tmp_path):
    limit = 200_000  # ~24 objects of 8 KiB
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_fill_cache, args=(str(tmp_path), limit, w)) for w in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    cache = LocalCache(tmp_path, limit)
    cache.evict()
    assert 0 < cache.size() <= limit
    assert not [p for p in tmp_path.rglob("*") if ".tmp." in p.name]


def test_local_cache_evicts_least_recently_used(tmp_path):
    blob = encode_tensor(random_bf16(32, 32))
    cache = LocalCache(tmp_path, len(blob) * 2 + 10)
    cache.put("a", blob)
    time.sleep(0.02)
    cache.put("b", blob)
    time.sleep(0.02)
    assert cache.get("a") is not None  # a is now more recent than b
    time.sleep(0.02)
    cache.put("c", blob)
    cache.evict()
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None


def test_store_reads_through_the_cache_and_repairs_a_damaged_copy(tmp_path):
    store = FeatureStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache", cache_size_gib=0.01)
    store.open([SPATIAL], create=True)
    key = store.spatial_key(["q"])
    tensor = random_bf16(16, 16, 8)
    store.put_tensor(key, tensor)
    cached = tmp_path / "cache" / key
    assert cached.exists()
    cached.write_bytes(cached.read_bytes()[:-3])  # damaged local copy
    assert same_bits(store.get_tensor(key), tensor)
    assert same_bits(decode_tensor(cached.read_bytes(), key), tensor)  # refilled from the store


def test_wait_complete(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    start = time.monotonic()
    with pytest.raises(JobError, match="did not finish within 0s"):
        store.wait_complete("abc", timeout_s=0.2, poll_s=0.05)
    assert time.monotonic() - start < load_scaled(5)
    store.write_record("markers/abc/COMPLETE.json", {"samples": 3})
    assert store.wait_complete("abc", timeout_s=1)["samples"] == 3


def test_read_through_source_computes_once_and_writes_back(tmp_path, store):
    store.open([SPATIAL, VISION], create=True)
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(name.encode() * 10)
    sample = Sample(id="ep/1", images=("a.png", "b.png"), conversations=(), frame_paths=())
    calls = []

    def compute_spatial(s):
        calls.append(s.id)
        return random_bf16(2, 2, 2048, seed=3)

    source = StoreFeatureSource(store, image_root=tmp_path, compute_spatial=compute_spatial,
                                compute_vision=lambda ref: random_bf16(4, 1280, seed=len(ref)))
    first = source.get_spatial(sample)
    again = StoreFeatureSource(store, image_root=tmp_path, compute_spatial=compute_spatial)
    assert same_bits(again.get_spatial(sample), first) and calls == ["ep/1"]
    source.get_vision("a.png")
    hashes = {name: sha256_file(tmp_path / name) for name in ("a.png", "b.png")}
    assert store.missing([sample], hashes, vision=False) == []
    assert store.missing([sample], hashes, vision=True) == ["ep/1"]  # b.png has no vision object yet
    source.get_vision("b.png")
    assert store.missing([sample], hashes, vision=True) == []
    (tmp_path / "a.png").write_bytes(b"changed")  # new content -> new key -> recomputed
    again.get_spatial(sample)
    assert calls == ["ep/1", "ep/1"]


def test_precomputed_source_without_features_names_the_sample(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    store.open([SPATIAL], create=True)
    sample = Sample(id="ep/9", images=("a.png",), conversations=(), frame_paths=())
    source = StoreFeatureSource(store, frame_hashes={"a.png": "f" * 64})
    with pytest.raises(JobError, match="ep/9"):
        source.get_spatial(sample)
    with pytest.raises(JobError, match="not in the store's frame index"):
        source.get_spatial(Sample(id="x", images=("zzz.png",), conversations=(), frame_paths=()))


def test_unsupported_url_scheme():
    with pytest.raises(JobError, match="gs:// is not supported"):
        FeatureStore("gs://bucket/x")
    assert Path(FeatureStore("file:///tmp/x").root) == Path("/tmp/x")


@pytest.mark.slow
def test_loader_bench_tiny_feeds_real_objects_through_the_trainers_loader(tmp_path):
    """bench/loader.py --tiny: the product's loader (dataset, collator, sampler, DataLoader workers,
    prefetcher) on a file:// store, against the step rate of a step-profile result."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    profile = repo / "bench" / "results" / "2026-11-30-nvidia-h200-1-step_profile.json"
    proc = subprocess.run([sys.executable, str(repo / "bench" / "loader.py"), "--tiny", "--out", str(tmp_path),
                           "--step-profile", str(profile)],
                          capture_output=True, text=True, timeout=600, cwd=repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [written] = tmp_path.glob("loader-*-cpu-1-tiny.json")
    record = json.loads(written.read_text())
    assert record["card"] == "cpu" and record["store"].startswith("file://")
    assert [row["workers"] for row in record["rows"]] == [0, 1]
    assert all(row["samples"] > 0 and row["samples_per_s_per_rank"] > 0 for row in record["rows"])
    assert record["mb_per_sample"] == pytest.approx((2 * 4 * 2048 + 9 * 8 * 1280) * 2 / 1e6)
    fastest = min(v["s_per_micro_step"]["micro_step"] for v in json.loads(profile.read_text())["variants"].values())
    assert record["consume"]["samples_per_s_per_gpu"] == pytest.approx(1 / fastest)
    assert record["headroom"] == pytest.approx(
        max(row["samples_per_s_per_rank"] for row in record["rows"]) * fastest)
    paced = record["paced"]
    assert paced["step_s"] == pytest.approx(fastest) and paced["samples"] > 0 and 0 <= paced["data_wait"] < 1
    assert "samples/s per rank" in proc.stdout and "per worker" in proc.stdout and "data_wait" in proc.stdout

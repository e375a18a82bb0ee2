"""Nothing wrong is trained on: frame errors name their record, image paths stay under
data.image_root, the frame index is checksummed and tied to the store, corrupt objects are
quarantined under the bad-sample policy, credentials never sit in URLs nor reach a log line, and
`--out` files are written whole with normal permissions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_precompute import _models, tiny_models, write_spec  # noqa: F401 (the fixtures write_spec needs)

from janus_job.config.load import load_spec
from janus_job.data.annotations import load_annotations, resolve_image
from janus_job.errors import JobError
from janus_job.features.encoders import load_encoders
from janus_job.features.precompute import run_worker

RECORD = {"id": "ep7/003", "conversations": [{"from": "human", "value": "<image>go"}, {"from": "gpt", "value": "STOP"}]}


def annotation_file(tmp_path: Path, image: str) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps([dict(RECORD, images=[image])]))
    return path


# ---------------------------------------------------------------- frame errors name their record


def test_a_corrupt_frame_in_precompute_names_the_annotation_file_record_and_path(tmp_path):
    job = load_spec(write_spec(tmp_path, str(tmp_path / "store")))
    annotations = load_annotations(job.data.annotations, job.data.image_root)
    sample = annotations.samples[4]
    victim = Path(sample.frame_paths[-1])
    victim.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(JobError) as caught:
        run_worker(job, load_encoders(job, "cpu", vision=False), worker=0, workers=1)
    message = str(caught.value)
    first_user = next(s for s in annotations.samples if str(victim) in s.frame_paths)
    assert f"frame {victim} ({job.data.annotations}, record {first_user.id!r}) is not a readable image" in message
    assert "BytesIO" not in message and " at 0x" not in message


def test_a_missing_frame_in_precompute_names_its_record(tmp_path):
    job = load_spec(write_spec(tmp_path, str(tmp_path / "store")))
    annotations = load_annotations(job.data.annotations, job.data.image_root)
    victim = Path(annotations.samples[0].frame_paths[0])
    victim.unlink()
    with pytest.raises(JobError, match=rf"frame {victim} \({job.data.annotations}, record '.+'\) does not exist"):
        run_worker(job, load_encoders(job, "cpu", vision=False), worker=0, workers=1)


def test_skip_precompute_over_two_pods_records_every_bad_sample_in_the_marker(tmp_path):
    """A deleted frame (found when hashing) and a truncated one (its header reads, its pixels do not:
    found when decoding), their samples spread over both pods' workers."""
    from janus_job.features.precompute import run_pod
    from janus_job.features.store import FeatureStore

    spec_path = write_spec(tmp_path, str(tmp_path / "store"), pods=2, batch=3)
    spec = json.loads(spec_path.read_text())
    spec["data"]["on_bad_sample"] = "skip"
    spec_path.write_text(json.dumps(spec))
    job = load_spec(spec_path)
    annotations = load_annotations(job.data.annotations, job.data.image_root)
    gone, cut = annotations.samples[0].frame_paths[0], annotations.samples[-1].frame_paths[-1]
    Path(gone).unlink()
    whole = Path(cut).read_bytes()
    Path(cut).write_bytes(whole[: len(whole) // 2])
    expected = {s.id: (gone if gone in s.frame_paths else cut) for s in annotations.samples
                if gone in s.frame_paths or cut in s.frame_paths}
    assert {s.index % 2 for s in annotations.samples if s.id in expected} == {0, 1}

    reports = run_pod(job, "unused", index=1) + run_pod(job, "unused", index=0)
    assert sum(len(r.bad_samples) for r in reports) == len(expected)
    record = FeatureStore.from_spec(job).completion(annotations.digest)
    assert set(record["bad_samples"]) == set(expected)
    for sample_id, path in expected.items():
        why = record["bad_samples"][sample_id]
        assert why.startswith(f"data.annotations {job.data.annotations}: sample {sample_id}: frame ")
        assert f"({path}): " + ("does not exist" if path == gone else "is not a readable image (") in why

    from typer.testing import CliRunner

    from janus_job.cli import app

    result = CliRunner().invoke(app, ["features", "verify", "--spec", str(spec_path), "--json"])
    assert result.exit_code == 0, result.output  # the samples left out are not missing ones
    verified = json.loads(result.output)
    assert verified["bad_samples"] == len(expected) and verified["missing_samples"] == 0


# ---------------------------------------------------------------- image paths stay under image_root


@pytest.mark.parametrize("image", ["../../../outside.jpg", "a/../../outside.jpg", "/etc/outside.jpg", ".."])
def test_paths_leaving_image_root_are_refused_with_the_record_named(tmp_path, image):
    path = annotation_file(tmp_path, image)
    with pytest.raises(JobError) as caught:
        load_annotations(path, tmp_path / "images")
    message = str(caught.value)
    assert f"{path}: record 0 (id 'ep7/003'): field 'images[0]'" in message
    assert repr(image) in message and "data.image_root" in message


def test_paths_inside_image_root_resolve_there(tmp_path):
    root = tmp_path / "images"
    assert load_annotations(annotation_file(tmp_path, "ep7/./x/../003.jpg"), root).samples[0].frame_paths == (
        str(root / "ep7" / "003.jpg"),)
    inside = str(root / "ep7" / "003.jpg")
    assert load_annotations(annotation_file(tmp_path, inside), root).samples[0].frame_paths == (inside,)
    assert resolve_image("ep/1.jpg", "s3://bucket/frames/") == "s3://bucket/frames/ep/1.jpg"
    with pytest.raises(ValueError, match="outside data.image_root"):
        resolve_image("s3://bucket/other/1.jpg", "s3://bucket/frames")
    with pytest.raises(ValueError, match="outside data.image_root"):
        resolve_image("s3://bucket/frames/../other/1.jpg", "s3://bucket/frames")


def test_absolute_paths_outside_need_the_explicit_opt_in(tmp_path):
    outside = str(tmp_path / "elsewhere" / "003.jpg")
    path = annotation_file(tmp_path, outside)
    with pytest.raises(JobError, match="allow_absolute_image_paths"):
        load_annotations(path, tmp_path / "images")
    loaded = load_annotations(path, tmp_path / "images", allow_absolute=True)
    assert loaded.samples[0].frame_paths == (outside,)
    with pytest.raises(JobError, match=r"'\.\./x\.jpg' leaves data.image_root"):  # '..' stays refused
        load_annotations(annotation_file(tmp_path, "../x.jpg"), tmp_path / "images", allow_absolute=True)


def test_the_spec_opt_in_reaches_precompute(tmp_path):
    spec_path = write_spec(tmp_path, str(tmp_path / "store"))
    annotations = json.loads((tmp_path / "train.json").read_text())
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    first = Path(tmp_path / "images" / annotations[0]["images"][0])
    (moved / first.name).write_bytes(first.read_bytes())
    annotations[0]["images"] = [str(moved / first.name)]
    (tmp_path / "train.json").write_text(json.dumps(annotations))
    with pytest.raises(JobError, match="record 0 .*allow_absolute_image_paths"):
        run_worker(job := load_spec(spec_path), load_encoders(job, "cpu", vision=False), worker=0, workers=1)
    spec = json.loads(spec_path.read_text())
    spec["data"]["allow_absolute_image_paths"] = True
    spec_path.write_text(json.dumps(spec))
    report = run_worker(job := load_spec(spec_path), load_encoders(job, "cpu", vision=False), worker=0, workers=1)
    assert report.computed_spatial == 20


# ---------------------------------------------------------------- --out files


def render(spec: Path, out: Path):
    from typer.testing import CliRunner

    from janus_job.cli import app

    return CliRunner().invoke(app, ["render", str(spec), "--out", str(out)])


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minimal.yaml"


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_render_output_has_normal_permissions(tmp_path, umask, file_mode, dir_mode):
    import os
    import stat

    previous = os.umask(umask)
    try:
        result = render(EXAMPLE, tmp_path / "new" / "out")
        assert result.exit_code == 0, result.output
        existing = tmp_path / "existing"
        existing.mkdir(mode=0o755)
        (existing / "deepspeed.json").write_text("old")
        result = render(EXAMPLE, existing)
        assert result.exit_code == 0, result.output
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new" / "out").stat().st_mode) == dir_mode
    for folder in (tmp_path / "new" / "out", existing):
        for name in ("deepspeed.json", "manifests.yaml"):
            assert stat.S_IMODE((folder / name).stat().st_mode) == file_mode, (folder, name)
    assert (existing / "deepspeed.json").read_text() != "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "new"]  # no staging left


def test_a_failed_render_leaves_the_old_files_and_no_mix(tmp_path):
    out = tmp_path / "out"
    assert render(EXAMPLE, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    changed = tmp_path / "changed.yaml"
    changed.write_text(EXAMPLE.read_text().replace("name: janus-minimal", "name: janus-changed"))

    (out / "manifests.yaml").unlink()
    (out / "manifests.yaml").mkdir()  # the second file cannot be replaced: the first must roll back
    result = render(changed, out)
    assert result.exit_code != 0 and isinstance(result.exception, JobError), result.output
    assert "nothing there was changed" in str(result.exception)
    assert (out / "deepspeed.json").read_bytes() == before["deepspeed.json"]
    assert (out / "notes.txt").read_text() == "mine"
    (out / "manifests.yaml").rmdir()

    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text() + "\nunknown_key: 1\n")
    assert render(bad, out).exit_code != 0  # refused before anything is written
    assert sorted(p.name for p in out.iterdir()) == ["deepspeed.json", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "changed.yaml", "out"]
    assert render(changed, out).exit_code == 0
    assert (out / "manifests.yaml").read_text() != before["manifests.yaml"].decode()


# ---------------------------------------------------------------- credentials never in URLs, never printed

SENTINEL = "sentinel-Zq7xK2pW"
CREDENTIAL_URLS = [
    ("features.store", f"s3://AKIAEXAMPLE:{SENTINEL}@janus-features/r2r"),
    ("features.endpoint_url", f"https://user:{SENTINEL}@minio.example:9000"),
    ("model.qwen", f"https://hf-user:{SENTINEL}@models.example/qwen"),
    ("data.image_root", f"s3://{SENTINEL}@datasets/r2r/images"),
    ("training.checkpoint.url", f"s3://key:{SENTINEL}@janus-checkpoints/run"),
]


def _with(data: dict, dotted: str, value: str) -> dict:
    import copy

    data = copy.deepcopy(data)
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data


@pytest.mark.parametrize("field, url", CREDENTIAL_URLS, ids=[c[0] for c in CREDENTIAL_URLS])
def test_credentials_inside_a_url_are_refused_by_validate_and_helm_without_repeating_them(field, url):
    import helm_python
    import yaml

    from janus_job.config.load import validate_spec
    from janus_job.deploy.render import CHART_DIR

    data = _with(yaml.safe_load(EXAMPLE.read_text()), field, url)
    with pytest.raises(JobError) as caught:
        validate_spec(data)
    message = str(caught.value)
    assert f"  - {field}: " in message and "holds credentials inside the URL" in message
    assert "credentials_secret" in message and SENTINEL not in message
    with helm_python.Chart.load(CHART_DIR) as chart:  # the values schema refuses them too
        with pytest.raises(helm_python.HelmError) as refused:
            chart.render(values=data, name="janus-train", namespace="janus", is_install=True)
    assert "/" + field.replace(".", "/") in str(refused.value)  # (Helm's schema errors quote the value)


def test_the_store_refuses_credentials_in_its_urls_without_printing_them():
    from janus_job.features.store import FeatureStore, has_url_credentials

    for url in (f"s3://AKIA:{SENTINEL}@bucket/x", f"file://u:{SENTINEL}@/tmp/x"):
        with pytest.raises(JobError, match="holds credentials inside the URL") as caught:
            FeatureStore(url)
        assert SENTINEL not in str(caught.value)
    with pytest.raises(JobError, match="features.endpoint_url") as caught:
        FeatureStore("s3://bucket/x", endpoint_url=f"http://u:{SENTINEL}@127.0.0.1:9000")
    assert SENTINEL not in str(caught.value)
    assert not has_url_credentials("s3://bucket/frames/a@b.jpg") and not has_url_credentials("/data/a@b")


# ---------------------------------------------------------------- the frame index is checksummed and tied


@pytest.fixture(scope="module")
def demo_job(tmp_path_factory) -> Path:
    """The demo's tiny job (4 episodes of 6 frames, 24 samples) with a complete store."""
    from janus_job.demo.run import precompute_features, prepare_job

    # one optimizer step over a global batch of all 24 samples: every sample is read in step 1
    spec_path = prepare_job(tmp_path_factory.mktemp("integrity-job"), steps=1, gpu=False, global_batch_size=24)
    precompute_features(spec_path)
    return spec_path


def copy_job(job: Path, target: Path, **data) -> Path:
    """The job with its own copy of the store (and of the frames when they are changed)."""
    import shutil

    import yaml

    shutil.copytree(job.parent / "store", target / "store")
    spec = yaml.safe_load(job.read_text())
    spec["features"]["store"] = str(target / "store")
    spec["training"]["checkpoint"]["url"] = str(target / "checkpoints")
    spec["data"].update(data)
    path = target / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def open_store(spec_path: Path):
    from janus_job.data.annotations import load_spec_annotations
    from janus_job.features.store import FeatureStore

    spec = load_spec(spec_path)
    store = FeatureStore.from_spec(spec, local_cache=False)
    store.open(load_encoders(spec, "cpu").fingerprints(), create=False)
    return spec, store, load_spec_annotations(spec)


def remap(store_root: Path, digest: str, *, reseal_shard: bool, reseal_marker: bool) -> str:
    """Swaps the frame hashes of episodes ep000 and ep001 (equal length: every feature key still
    exists, so the store looks complete); returns the shard's key."""
    from janus_job.features.store import seal

    (shard,) = sorted((store_root / "frames" / digest).iterdir())
    record = json.loads(shard.read_text())
    frames = record["frames"]
    for name in [n for n in frames if n.startswith("ep000/")]:
        other = name.replace("ep000/", "ep001/")
        frames[name], frames[other] = frames[other], frames[name]
    shard.write_text(json.dumps(seal(record) if reseal_shard else record))
    key = f"frames/{digest}/{shard.name}"
    if reseal_marker:
        marker = store_root / "markers" / digest / "COMPLETE.json"
        completion = json.loads(marker.read_text())
        completion["frame_index"][key] = json.loads(shard.read_text())["sha256"]
        marker.write_text(json.dumps(seal(completion)))
    return key


@pytest.mark.parametrize("reseal_shard, reseal_marker, refusal", [
    (False, False, "does not match its checksum"),
    (True, False, "is not the frame index precompute completed with"),
    (True, True, "does not match the frames"),
], ids=["shard-edited", "shard-resealed", "shard-and-marker-resealed"])
def test_a_consistently_remapped_frame_index_is_refused_with_the_object_named(
        demo_job, tmp_path, reseal_shard, reseal_marker, refusal):
    from typer.testing import CliRunner

    from janus_job.cli import app

    spec_path = copy_job(demo_job, tmp_path)
    spec, store, annotations = open_store(spec_path)
    original = store.completed_frame_index(annotations.digest)
    key = remap(tmp_path / "store", annotations.digest, reseal_shard=reseal_shard, reseal_marker=reseal_marker)

    # what the old reader did (merge the shards' mappings): every key present, wrong features served
    (shard,) = (tmp_path / "store" / "frames" / annotations.digest).iterdir()
    remapped = json.loads(shard.read_text())["frames"]
    assert remapped != original and store.missing(annotations.samples, remapped, vision=True) == []

    with pytest.raises(JobError, match=refusal) as caught:  # what the trainer calls
        store.completed_frame_index(annotations.digest, frame_paths=annotations.image_paths(), spot_check=64)
    assert key in str(caught.value)
    result = CliRunner().invoke(app, ["features", "verify", "--spec", str(spec_path)])
    assert isinstance(result.exception, JobError), result.output
    assert key in str(result.exception) and ("differ from the frame index" in str(result.exception)
                                             or refusal in str(result.exception))


def test_index_shards_and_markers_are_tied_to_the_fingerprint_and_annotations(demo_job, tmp_path):
    from janus_job.features.store import FeatureStore, Fingerprint, seal

    spec_path = copy_job(demo_job, tmp_path)
    spec, store, annotations = open_store(spec_path)
    tiny = load_encoders(spec, "cpu")
    (shard,) = (tmp_path / "store" / "frames" / annotations.digest).iterdir()
    key = f"frames/{annotations.digest}/{shard.name}"
    record = json.loads(shard.read_text())
    assert record["fingerprints"] == {fp.kind: fp.id for fp in tiny.fingerprints()}
    assert store.completion(annotations.digest)["frame_index"] == {key: record["sha256"]}

    other = FeatureStore(str(tmp_path / "store"))
    fields = dict(tiny.spatial_fingerprint.fields, compute="other")
    other._fingerprints["spatial"] = Fingerprint("spatial", fields)  # a consumer of another function
    with pytest.raises(JobError, match=rf"{key} was written for another spatial fingerprint"):
        other.frame_index(annotations.digest)

    moved = tmp_path / "store" / "frames" / ("0" * 32)
    moved.mkdir()
    (moved / shard.name).write_text(shard.read_text())
    with pytest.raises(JobError, match="belongs to other annotations"):
        store.frame_index("0" * 32)

    marker = tmp_path / "store" / "markers" / annotations.digest / "COMPLETE.json"
    completion = json.loads(marker.read_text())
    completion["samples"] += 1
    marker.write_text(json.dumps(completion))
    with pytest.raises(JobError, match="COMPLETE.json does not match its checksum"):
        store.completion(annotations.digest)
    marker.write_text(json.dumps({k: v for k, v in completion.items() if k != "sha256"}))
    with pytest.raises(JobError, match="carries no checksum"):
        store.completion(annotations.digest)
    manifest = tmp_path / "store" / "manifest-spatial.json"
    edited = json.loads(manifest.read_text())
    edited["format"] = 7
    manifest.write_text(json.dumps(edited))
    with pytest.raises(JobError, match="manifest-spatial.json does not match its checksum"):
        FeatureStore(str(tmp_path / "store")).open(tiny.fingerprints(), create=False)
    assert seal(edited)["sha256"] != edited["sha256"]


def run_cli(*args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    full = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "JANUS_STATS_DIR"):
        full.pop(name, None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "janus_job.cli", *args], capture_output=True, text=True,
                          env=full, timeout=3600)  # a hang guard only: busy machines are slow


@pytest.mark.slow
def test_the_trainer_refuses_a_remapped_index_before_building_the_model(demo_job, tmp_path):
    spec_path = copy_job(demo_job, tmp_path)
    _spec, _store, annotations = open_store(spec_path)
    key = remap(tmp_path / "store", annotations.digest, reseal_shard=True, reseal_marker=True)
    result = run_cli("train", "--spec", str(spec_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "does not match the frames" in result.stderr and key in result.stderr
    assert "train start" not in result.stdout


# ---------------------------------------------------------------- corrupt objects: quarantine and policy


def corrupt_one_spatial_object(spec_path: Path) -> tuple[str, str]:
    """Flips a payload byte of one spatial object; returns (its key, the sample that reads it)."""
    from janus_job.features.store import StoreFeatureSource

    _spec, store, annotations = open_store(spec_path)
    source = StoreFeatureSource(store, frame_hashes=store.completed_frame_index(annotations.digest))
    sample = annotations.samples[7]
    key = source.sample_keys(sample)[0]
    path = Path(store.root) / key
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x10
    path.write_bytes(bytes(blob))
    return key, sample.id


def with_policy(spec_path: Path, policy: str) -> Path:
    import yaml

    spec = yaml.safe_load(spec_path.read_text())
    spec["data"].update(on_bad_sample=policy, max_bad_fraction=0.1)  # 1 of these 24 samples is 4%
    spec_path.write_text(yaml.safe_dump(spec))
    return spec_path


def train_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("train step=")]


@pytest.mark.slow
def test_a_corrupt_object_fails_the_run_once_and_the_restart_replaces_it(demo_job, tmp_path):
    """OnFailure semantics: the same spec runs again after a failure."""
    spec_path = with_policy(copy_job(demo_job, tmp_path), "fail")
    key, sample_id = corrupt_one_spatial_object(spec_path)

    first = run_cli("train", "--spec", str(spec_path))
    assert first.returncode == 2, first.stdout + first.stderr
    error = first.stderr.strip().splitlines()[-1]
    assert f"sample {sample_id}" in error and key in error and "quarantined" in error
    assert "checksum mismatch" in error and "Traceback" not in error
    assert (tmp_path / "store" / "quarantine" / f"{key}.json").is_file()

    restarted = run_cli("train", "--spec", str(spec_path))
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "train data: 1 of 24 samples read quarantined (corrupt) features" in restarted.stdout
    assert train_lines(restarted.stdout)[-1].endswith(" bad_samples=1"), restarted.stdout


@pytest.mark.slow
def test_skip_finishes_the_run_with_the_count_and_precompute_repairs_the_object(demo_job, tmp_path):
    from janus_job.demo.run import precompute_features

    spec_path = with_policy(copy_job(demo_job, tmp_path), "skip")
    key, sample_id = corrupt_one_spatial_object(spec_path)
    result = run_cli("train", "--spec", str(spec_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"train bad_sample sample={sample_id} key={key} action=replaced" in result.stdout
    assert train_lines(result.stdout)[-1].endswith(" bad_samples=1"), result.stdout
    assert (tmp_path / "store" / "quarantine" / f"{key}.json").is_file()

    precompute_features(spec_path)  # recomputes the quarantined object and ends its quarantine
    _spec, store, annotations = open_store(spec_path)
    assert not (tmp_path / "store" / "quarantine" / f"{key}.json").exists()
    assert store.check_objects([key]) == []
    assert store.completion(annotations.digest)["verified"]["repaired"] == 1
    clean = run_cli("train", "--spec", str(spec_path))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "bad_samples=" not in clean.stdout and "train data:" not in clean.stdout


@pytest.mark.slow
def test_too_many_bad_samples_stop_the_run_before_training(demo_job, tmp_path):
    from janus_job.features.store import FeatureStore, StoreFeatureSource

    spec_path = with_policy(copy_job(demo_job, tmp_path), "skip")
    _spec, store, annotations = open_store(spec_path)
    source = StoreFeatureSource(store, frame_hashes=store.completed_frame_index(annotations.digest))
    for sample in annotations.samples[:3]:  # 3 of 24 > 0.1
        store.quarantine(source.sample_keys(sample)[0], "test")
    import yaml

    spec = yaml.safe_load(spec_path.read_text())
    spec["data"]["max_bad_fraction"] = 0.1
    spec_path.write_text(yaml.safe_dump(spec))
    result = run_cli("train", "--spec", str(spec_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "3 of 24 samples have corrupt (quarantined) features, more than data.max_bad_fraction 0.1" in result.stderr
    assert "train start" not in result.stdout
    assert FeatureStore(str(tmp_path / "store")).quarantined() == {source.sample_keys(s)[0]
                                                                  for s in annotations.samples[:3]}


def break_two_frames(spec_path: Path, tmp_path: Path) -> tuple[dict[str, tuple[str, str]], str]:
    """The job on its own copy of the frames and annotations, with one frame deleted and one
    overwritten with garbage, each read by one sample only; returns (sample id -> (frame as
    written, path)) and the annotation file."""
    import shutil

    import yaml

    spec = yaml.safe_load(spec_path.read_text())
    shutil.copytree(spec["data"]["image_root"], tmp_path / "images")
    annotations = tmp_path / "train.json"
    shutil.copyfile(spec["data"]["annotations"], annotations)
    spec["data"].update(annotations=str(annotations), image_root=str(tmp_path / "images"))
    spec_path.write_text(yaml.safe_dump(spec))
    samples = load_annotations(annotations, tmp_path / "images").samples
    readers: dict[str, list] = {}
    for sample in samples:
        for image, path in zip(sample.images, sample.frame_paths):
            readers.setdefault(image, []).append((sample.id, path))
    lonely = {found[0][0]: (image, found[0][1]) for image, found in readers.items() if len(found) == 1}
    (gone_id, (gone_image, gone_path)), (bad_id, (bad_image, bad_path)) = list(lonely.items())[::len(lonely) - 1]
    Path(gone_path).unlink()
    Path(bad_path).write_bytes(b"\xff\xd8 not a jpeg")
    return {gone_id: (gone_image, gone_path), bad_id: (bad_image, bad_path)}, str(annotations)


def edit_spec(spec_path: Path, **sections) -> Path:
    import yaml

    spec = yaml.safe_load(spec_path.read_text())
    for section, values in sections.items():
        spec[section].update(values)
    spec_path.write_text(yaml.safe_dump(spec))
    return spec_path


@pytest.mark.slow
def test_missing_and_corrupt_frames_are_left_out_under_skip_counted_and_capped(demo_job, tmp_path, capsys):
    """skip: precompute records the two samples (annotation file, record, frame path) in its
    checksummed completion marker, training drops them and reports bad_samples=2 from the start line
    to the final record; fail names the frame; over data.max_bad_fraction, precomputed or online,
    the run is refused before training."""
    from janus_job.demo.run import precompute_features

    spec_path = with_policy(copy_job(demo_job, tmp_path), "skip")  # max_bad_fraction 0.1: 2 of 24 is 8%
    # 22 samples are left: a global batch of 20 is one step; no export (not what this test is about)
    edit_spec(spec_path, training={"global_batch_size": 20, "export": False})
    victims, annotation_file = break_two_frames(spec_path, tmp_path)
    gone, bad = victims

    precompute_features(spec_path)
    log = capsys.readouterr().out
    for sample_id, (image, path) in victims.items():
        assert (f"bad_sample data.annotations {annotation_file}: sample {sample_id}: frame {image} ({path}): "
                f"{'does not exist' if sample_id == gone else 'is not a readable image ('}") in log, log
    assert "22 samples covered, 2 left out with missing or unreadable frames (bad_samples=2" in log
    assert "BytesIO" not in log and " at 0x" not in log
    _spec, store, annotations = open_store(spec_path)
    recorded = store.completion(annotations.digest)["bad_samples"]  # checksum verified on read
    assert sorted(recorded) == sorted(victims) and victims[gone][1] in recorded[gone]

    metrics = tmp_path / "metrics.jsonl"
    trace = tmp_path / "trace.jsonl"
    result = run_cli("train", "--spec", str(spec_path),
                     env={"JANUS_METRICS_FILE": str(metrics), "JANUS_SAMPLE_TRACE": str(trace)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("train data: 2 of 24 samples left out: precompute found missing or unreadable frames "
            "(data.on_bad_sample: skip; first: data.annotations") in result.stdout
    start = next(line for line in result.stdout.splitlines() if line.startswith("train start "))
    assert " samples=22 " in start and start.endswith(" bad_samples=2"), start
    assert train_lines(result.stdout)[-1].endswith(" bad_samples=2"), result.stdout
    done = next(line for line in result.stdout.splitlines() if line.startswith("train done "))
    assert done.endswith(" bad_samples=2")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records[-1]["event"] == "done" and records[-1]["bad_samples"] == 2
    assert records[-2]["event"] == "train" and records[-2]["bad_samples"] == 2
    trained = {sid for line in trace.read_text().splitlines() for sid in json.loads(line)["sample_ids"]}
    assert len(trained) == 20 and not trained & set(victims)

    failing = run_cli("train", "--spec", str(edit_spec(spec_path, data={"on_bad_sample": "fail"})))
    assert failing.returncode == 2, failing.stdout + failing.stderr
    error = failing.stderr.strip().splitlines()[-1]
    first = min(victims)  # the marker keeps them sorted
    image, path = victims[first]
    assert f"data.annotations {annotation_file}: sample {first}: frame {image} ({path})" in error
    assert "data.on_bad_sample: fail" in error and "train start" not in failing.stdout

    edit_spec(spec_path, data={"on_bad_sample": "skip", "max_bad_fraction": 0.05})
    capped = run_cli("train", "--spec", str(spec_path))
    assert capped.returncode == 2, capped.stdout + capped.stderr
    assert ("2 of 24 samples have missing or unreadable frames, more than data.max_bad_fraction 0.05 allows"
            in capped.stderr) and "train start" not in capped.stdout

    online = run_cli("train", "--spec", str(edit_spec(spec_path, features={"mode": "online", "cache_vision": False})))
    assert online.returncode == 2, online.stdout + online.stderr  # the header pass finds both before the sampler
    assert "train data: 2 of 24 samples left out: 2 of " in online.stdout
    assert ("2 of 24 samples have missing or unreadable frames, more than data.max_bad_fraction 0.05 allows"
            in online.stderr) and "train start" not in online.stdout


def test_precompute_checks_what_it_reuses_and_recomputes_a_corrupt_object(tmp_path):
    from janus_job.features.precompute import finalize
    from janus_job.features.store import FeatureStore

    job = load_spec(write_spec(tmp_path, str(tmp_path / "store")))
    encoders = load_encoders(job, "cpu")
    run_worker(job, encoders, worker=0, workers=1)
    store = FeatureStore(str(tmp_path / "store"))
    victim = store.list_keys("vision")[2]
    path = tmp_path / "store" / victim
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    report = run_worker(job, encoders, worker=0, workers=1)
    assert (report.verified_stored, report.repaired, report.computed_vision) == (40, 1, 1)
    assert store.check_objects(store.list_keys("vision") + store.list_keys("spatial")) == []
    record = finalize(job, encoders.fingerprints(), 1)
    assert record["verified"] == {"stored_objects_checked": 40, "repaired": 1}


@pytest.mark.slow
def test_no_log_line_or_error_of_a_run_shows_the_secret(tmp_path, s3_server, s3_bucket):
    """precompute, verify and train on a moto S3 store with a sentinel secret in the environment,
    then failures (a corrupt object under on_bad_sample: fail, a missing bucket): the secret
    appears in no output."""
    import yaml

    from janus_job.demo.run import prepare_job

    secret = f"{SENTINEL}-secret-key"
    env = {"AWS_ACCESS_KEY_ID": "AKIASENTINELKEYID", "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    spec_path = prepare_job(tmp_path, steps=1, gpu=False)
    spec = yaml.safe_load(spec_path.read_text())
    spec["features"].update(store=f"s3://{s3_bucket}/features", endpoint_url=s3_server)
    spec_path.write_text(yaml.safe_dump(spec))

    outputs = []

    def run(*args: str, expect: int = 0):
        result = run_cli(*args, env=env)
        outputs.append(result.stdout + result.stderr)
        assert result.returncode == expect, result.stdout + result.stderr
        return result

    run("validate", str(spec_path))
    run("precompute", "--spec", str(spec_path), "--progress-interval", "0")
    run("features", "verify", "--spec", str(spec_path))
    assert train_lines(run("train", "--spec", str(spec_path)).stdout)

    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=secret)
    key = min(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="features/spatial/")["Contents"])
    blob = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    blob[-3] ^= 1
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(blob))
    spec["data"]["on_bad_sample"] = "fail"
    spec["training"]["global_batch_size"] = 24  # reads every sample: meets the corrupt object
    spec["training"]["checkpoint"]["url"] = str(tmp_path / "checkpoints-2")
    spec_path.write_text(yaml.safe_dump(spec))
    assert "corrupt" in run("train", "--spec", str(spec_path), expect=2).stderr
    assert "corrupt" in run("features", "verify", "--spec", str(spec_path), expect=2).stderr

    spec["features"]["store"] = f"s3://{s3_bucket}-missing/features"
    spec_path.write_text(yaml.safe_dump(spec))
    assert "does not exist" in run("precompute", "--spec", str(spec_path), expect=2).stderr

    assert len(outputs) == 7 and all(outputs)
    leaked = [text for text in outputs if secret in text or SENTINEL in text]
    assert not leaked, leaked[0][-2000:]

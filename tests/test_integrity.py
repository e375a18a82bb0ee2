"""Nothing wrong is trained on: frame errors name their record, image paths stay under
data.image_root, the frame index is checksummed and tied to the store, corrupt objects are
quarantined under the bad-sample policy, credentials never sit in URLs nor reach a log line, and
`--out` files are written whole with normal permissions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from janus_job.annotations import load_annotations, resolve_image
from janus_job.errors import JobError
from janus_job.precompute import run_worker, tiny_encoders
from janus_job.spec import load_spec
from test_precompute import write_spec

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
        run_worker(job, tiny_encoders(vision=False), worker=0, workers=1)
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
        run_worker(job, tiny_encoders(vision=False), worker=0, workers=1)


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
        run_worker(load_spec(spec_path), tiny_encoders(vision=False), worker=0, workers=1)
    spec = json.loads(spec_path.read_text())
    spec["data"]["allow_absolute_image_paths"] = True
    spec_path.write_text(json.dumps(spec))
    report = run_worker(load_spec(spec_path), tiny_encoders(vision=False), worker=0, workers=1)
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

    from janus_job.render import CHART_DIR
    from janus_job.spec import validate_spec

    data = _with(yaml.safe_load(EXAMPLE.read_text()), field, url)
    with pytest.raises(JobError) as caught:
        validate_spec(data)
    message = str(caught.value)
    assert f"{field}: holds credentials inside the URL" in message and "credentials_secret" in message
    assert SENTINEL not in message
    with helm_python.Chart.load(CHART_DIR) as chart:
        with pytest.raises(helm_python.HelmError) as refused:
            chart.render(values=data, name="janus-train", namespace="janus", is_install=True)
    assert f"{field}: holds credentials inside the URL" in str(refused.value)
    assert SENTINEL not in str(refused.value)


def test_the_store_refuses_credentials_in_its_urls_without_printing_them():
    from janus_job.store import FeatureStore, has_url_credentials

    for url in (f"s3://AKIA:{SENTINEL}@bucket/x", f"file://u:{SENTINEL}@/tmp/x"):
        with pytest.raises(JobError, match="holds credentials inside the URL") as caught:
            FeatureStore(url)
        assert SENTINEL not in str(caught.value)
    with pytest.raises(JobError, match="features.endpoint_url") as caught:
        FeatureStore("s3://bucket/x", endpoint_url=f"http://u:{SENTINEL}@127.0.0.1:9000")
    assert SENTINEL not in str(caught.value)
    assert not has_url_credentials("s3://bucket/frames/a@b.jpg") and not has_url_credentials("/data/a@b")

"""The trained model comes out: JanusVLN checkpoint directories written at the end of a real training
run (and with each checkpoint), by `janus-job export` from a ZeRO-3 checkpoint of another world size
and from an S3 checkpoint to S3, in bf16, checked against DeepSpeed's own consolidation; the clip rule
under real DeepSpeed; a trained merger is loaded, also when training continues from an export."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import ckpt_worker as worker
import pytest
import torch
import yaml
from test_train import janus_job

from janus_job.errors import JobError

STEP = "step-00000003"


def consolidated(checkpoint_root: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root), tag=STEP)


def check_export(export: Path, checkpoint_root: Path, spec: dict, base_merger: str = "fresh") -> None:
    """Weights equal DeepSpeed's consolidation; files 0644; base files byte-equal; the export
    reloads with from_pretrained, its merger is the trained one, its logits the trained model's.
    `base_merger`: where model.qwen's merger comes from (a JanusVLN checkpoint holds one)."""
    from safetensors.torch import load_file

    from janus_job.models.janusvln.build import build_model
    from janus_job.models.janusvln.export import BASE_FILES, janusvln_key

    assert (export / "config.json").exists()
    for path in export.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    qwen = Path(spec["model"]["qwen"])
    copied = [name for name in BASE_FILES if (qwen / name).exists()]
    assert "tokenizer_config.json" in copied
    for name in copied:
        assert (export / name).read_bytes() == (qwen / name).read_bytes(), name
    index = json.loads((export / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(export / shard))
    assert any(key.startswith("vggt.aggregator.") for key in tensors)
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["lam"] == 0.2 and config["reference_frame"] == "first"
    # JanusVLN's key layout (transformers 4.50): the LLM under model.*, the vision tower under visual.*
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert {"merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.2.bias", "visual.merger.ln_q.weight",
            "visual.blocks.0.attn.qkv.weight", "model.embed_tokens.weight", "model.norm.weight",
            "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"} <= set(tensors)
    assert any(key.startswith("vggt.aggregator.frame_blocks.0.") for key in tensors)
    assert not any(key.startswith(("model.language_model.", "model.visual.")) for key in tensors)

    trained = consolidated(checkpoint_root)
    assert any(name.startswith("merger.") for name in trained)
    for name, value in trained.items():
        torch.testing.assert_close(tensors[janusvln_key(name)].float(), value.float(), rtol=0, atol=0)

    reloaded = build_model(str(export), dtype=torch.float32)
    assert reloaded.merger_source == "checkpoint"
    base = build_model(str(qwen), dtype=torch.float32)
    assert base.merger_source == base_merger
    missing, _ = base.load_state_dict(trained, strict=False)
    assert not [m for m in missing if m.startswith("merger.") or "language_model" in m]
    for name, param in reloaded.merger.named_parameters():
        torch.testing.assert_close(param, trained["merger." + name], rtol=0, atol=0)
    ids = torch.randint(0, reloaded.config.text_config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = reloaded.lm_head(reloaded.model.language_model(input_ids=ids).last_hidden_state)
        theirs = base.lm_head(base.model.language_model(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(ours, theirs, rtol=1.6e-2, atol=1e-2)  # bf16 rounding; fp32 here: equal
    assert config["hidden_size"] == reloaded.config.text_config.hidden_size
    assert config["vggt_merger_hidden_dim"] == reloaded.merger.mlp[0].out_features

    # transformers' own Qwen2.5-VL class reads the exported (4.x-style) layout back bit-exactly
    from transformers import Qwen2_5_VLForConditionalGeneration

    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(export), dtype=torch.float32).state_dict()
    for name, tensor in reloaded.state_dict().items():
        if not name.startswith(("merger.", "vggt.")):
            torch.testing.assert_close(plain[name], tensor, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    from janus_job.demo.run import precompute_features, prepare_job

    root = tmp_path_factory.mktemp("export-job")
    spec_path = prepare_job(root, steps=3, gpu=False)
    spec = yaml.safe_load(spec_path.read_text())
    # a checkpoint at step 2 exported beside training (export_every_checkpoint), the last one at the end
    spec["training"]["checkpoint"].update(interval_steps=2, keep=2)
    spec["training"]["export_every_checkpoint"] = True
    spec_path.write_text(yaml.safe_dump(spec))
    precompute_features(spec_path)
    return spec_path


def trained(job: Path) -> Path:
    """The checkpoint root of the module's job, trained once whichever test asks first."""
    root = Path(yaml.safe_load(job.read_text())["training"]["checkpoint"]["url"])
    if not (root / STEP / "COMPLETE").exists():
        result = janus_job("train", "--spec", str(job))
        assert result.returncode == 0, result.stdout + result.stderr
    return root


@pytest.mark.slow
def test_training_ends_with_a_janusvln_export(job):
    result = janus_job("train", "--spec", str(job))
    assert result.returncode == 0, result.stdout + result.stderr
    spec = yaml.safe_load(job.read_text())
    root = Path(spec["training"]["checkpoint"]["url"])
    assert f"export done step=3 url={root}/export/{STEP}" in result.stdout
    assert "spatial_merger=fresh" in result.stdout
    check_export(root / "export" / STEP, root, spec)
    # training.export_every_checkpoint: the step-2 checkpoint was exported beside training, complete
    assert f"export done step=2 url={root}/export/step-00000002" in result.stdout
    assert (root / "export" / "step-00000002" / "config.json").exists()
    assert sorted(p.name for p in (root / "export").iterdir()) == ["step-00000002", STEP]  # no temporary left


@pytest.mark.slow
def test_export_needs_the_vggt_aggregator(job, tmp_path):
    """JanusVLN's loader has no other source for VGGT: a model.vggt without aggregator.* is refused."""
    from safetensors.torch import save_file

    from janus_job.models.janusvln.export import write_export

    spec = yaml.safe_load(job.read_text())
    root = trained(job)
    headless = tmp_path / "heads.safetensors"
    save_file({"camera_head.weight": torch.zeros(2)}, headless)
    with pytest.raises(JobError, match=r"model.vggt .*heads.safetensors has no aggregator\.\* tensors"):
        write_export(str(root / STEP), spec["model"]["qwen"], str(headless), str(tmp_path),
                     progress=lambda line: None)


@pytest.mark.slow
def test_cli_exports_a_zero3_checkpoint_of_two_ranks(job, tmp_path):
    """Continues from the module job's export (a JanusVLN checkpoint: its trained merger is loaded) with
    ZeRO-3 at two ranks; `janus-job export` writes that checkpoint out in one process."""
    spec = yaml.safe_load(job.read_text())
    janusvln = trained(job) / "export" / STEP
    assert (janusvln / "config.json").exists()
    spec["model"]["qwen"] = str(janusvln)
    spec["training"].update(gpus_per_node=2, global_batch_size=4, export=False)
    spec["training"]["checkpoint"].update(url=str(tmp_path / "checkpoints"), interval_steps=3)  # no export: save step 3
    spec["deepspeed"]["zero_stage"] = 3
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = subprocess.run(worker.trainer_command(2, spec_path), cwd=worker.REPO, capture_output=True, text=True,
                            env=worker.trainer_env(tmp_path / "trace-{rank}.jsonl", tmp_path / "staging"),
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "spatial_merger=checkpoint" in result.stdout and "spatial_merger=fresh" not in result.stdout
    assert not (tmp_path / "checkpoints" / "export").exists()  # training.export: false
    out = tmp_path / "exported"
    result = janus_job("export", str(spec_path), "--step", "3", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "saved at world size 2, ZeRO-3" in result.stdout and "export done step=3" in result.stdout
    check_export(out, tmp_path / "checkpoints", spec, base_merger="checkpoint")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_clip_mode_applies_the_reference_coefficient(mode, tmp_path):
    out = tmp_path / "clip.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{worker.free_port()}",
               str(Path(__file__).with_name("clip_worker.py")), "--clip-mode", mode, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONPATH": worker.REPO}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    r = json.loads(out.read_text())
    assert r["deepspeed_norm"] == pytest.approx(r["norm_of_sum"] / (1 if mode == "sum" else 4), rel=1e-5)
    assert r["sum_coef"] == pytest.approx(0.5, rel=1e-5) and r["mean_coef"] == 1.0  # the rules disagree here
    assert r["applied_coef"] == pytest.approx(r[f"{mode}_coef"], rel=1e-5)


@pytest.mark.slow
def test_bf16_export_is_the_fp32_export_rounded(job, tmp_path):
    """A bf16 job (deepspeed.bf16) exports bfloat16 tensors: each the fp32 export's tensor rounded, and the
    reloaded model's logits the fp32 export's within bf16 rounding."""
    from safetensors.torch import load_file

    from janus_job.models.janusvln.build import build_model
    from janus_job.models.janusvln.export import write_export

    spec = yaml.safe_load(job.read_text())
    assert spec["deepspeed"]["bf16"] is False  # the module's job exports fp32
    root = trained(job)
    fp32 = root / "export" / STEP
    if not (fp32 / "config.json").exists():
        result = janus_job("export", str(job), "--step", "3")
        assert result.returncode == 0, result.stdout + result.stderr
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    write_export(str(root / STEP), spec["model"]["qwen"], spec["model"]["vggt"], str(bf16), dtype="bfloat16",
                 progress=lambda line: None)

    def tensors(export: Path) -> dict:
        index = json.loads((export / "model.safetensors.index.json").read_text())
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(load_file(export / shard))
        return out

    wide, narrow = tensors(fp32), tensors(bf16)
    assert sorted(narrow) == sorted(wide)
    for name, tensor in narrow.items():
        assert wide[name].dtype == torch.float32 and tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(tensor, wide[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((fp32 / "config.json").read_text())["torch_dtype"] == "float32"

    models = [build_model(str(export), dtype=torch.float32) for export in (fp32, bf16)]
    ids = torch.randint(0, models[0].config.text_config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wide_logits, narrow_logits = (m.lm_head(m.model.language_model(input_ids=ids).last_hidden_state)
                                      for m in models)
    assert not torch.equal(wide_logits, narrow_logits)  # the rounding is there ...
    torch.testing.assert_close(narrow_logits, wide_logits, rtol=1.6e-2, atol=1e-2)  # ... and within bf16's


@pytest.mark.slow
def test_cli_exports_an_s3_checkpoint_to_s3_through_staging(job, tmp_path, s3_server, s3_env, s3_bucket):
    """Checkpoint and export on object storage: the checkpoint is fetched and the export written under the
    checkpoint staging directory (the pod's sized volume), never TMPDIR; config.json is uploaded last; a
    copy of the checkpoint staged for a resume is read in place instead of fetched again."""
    import boto3

    from janus_job.config.load import load_spec
    from janus_job.train.export import export_from_checkpoint

    spec = yaml.safe_load(job.read_text())
    root = trained(job)
    client = boto3.client("s3", endpoint_url=s3_server, region_name=s3_env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"])
    for path in sorted((root / STEP).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), s3_bucket, f"checkpoints/{path.relative_to(root).as_posix()}")
    spec["training"]["checkpoint"]["url"] = f"s3://{s3_bucket}/checkpoints"
    spec["training"]["export_every_checkpoint"] = False  # else cluster.checkpoint_staging_gib must be larger
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    staging, tmpdir = tmp_path / "staging", tmp_path / "tmpdir"
    tmpdir.mkdir()
    out = f"s3://{s3_bucket}/exported/{STEP}"
    env = {**s3_env, "AWS_ENDPOINT_URL": s3_server, "JANUS_CHECKPOINT_STAGING": str(staging), "TMPDIR": str(tmpdir)}
    result = janus_job("export", str(spec_path), "--out", out, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    fetched = [line for line in lines if line.startswith("export fetching ")]
    assert len(fetched) == 2 and all(f" to {staging}/export/{STEP}-" in line for line in fetched), lines
    assert not list(tmpdir.iterdir()) and not list((staging / "export").iterdir())  # the scratch is removed

    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix=f"exported/{STEP}/")["Contents"]
    uploaded = {item["Key"].rsplit("/", 1)[-1]: item for item in listed}
    assert {"config.json", "model.safetensors.index.json", "tokenizer_config.json"} <= set(uploaded)
    order = [line.removeprefix("export uploading ") for line in lines if line.startswith("export uploading ")]
    assert sorted(order) == sorted(uploaded) and order[-1] == "config.json"  # complete once config.json is there
    assert uploaded["config.json"]["LastModified"] == max(item["LastModified"] for item in listed)

    # a resume's staged copy of the same checkpoint is read in place, and the export is the same bytes
    from janus_job.train.checkpoint import CheckpointManager, _stamp

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", s3_server)
        patch.setenv("JANUS_CHECKPOINT_STAGING", str(staging))
        loaded = load_spec(str(spec_path))
        c = loaded.training.checkpoint
        ref = CheckpointManager(c.url, keep=c.keep, interval_steps=c.interval_steps, rank=0,
                                world_size=1).ref_for_step(3)
        staged = staging / "load" / f"{STEP}-{_stamp(ref)}"
        staged.mkdir(parents=True)
        for path in (root / STEP).iterdir():
            if path.is_file():
                (staged / path.name).write_bytes(path.read_bytes())
        progress = []
        local = tmp_path / "local-export"
        export_from_checkpoint(loaded, step=3, out=str(local), progress=progress.append)
    assert f"export reading {staged}" in progress and not [p for p in progress if p.startswith("export fetching")]
    for name in uploaded:
        body = client.get_object(Bucket=s3_bucket, Key=f"exported/{STEP}/{name}")["Body"].read()
        assert body == (local / name).read_bytes(), name
    check_export(local, root, spec)

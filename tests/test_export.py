"""The trained model comes out: JanusVLN checkpoint directories written at the end of a real training
run and by `janus-job export` from a ZeRO-3 checkpoint of another world size, checked against
DeepSpeed's own consolidation; the clip rule under real DeepSpeed; a trained merger is loaded."""

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


def check_export(export: Path, checkpoint_root: Path, spec: dict) -> None:
    """Weights equal DeepSpeed's consolidation; files 0644; base files byte-equal; the export
    reloads with from_pretrained, its merger is the trained one, its logits the trained model's."""
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
    assert base.merger_source == "fresh"
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
    precompute_features(spec_path)
    return spec_path


@pytest.mark.slow
def test_training_ends_with_a_janusvln_export(job):
    result = janus_job("train", "--spec", str(job))
    assert result.returncode == 0, result.stdout + result.stderr
    spec = yaml.safe_load(job.read_text())
    root = Path(spec["training"]["checkpoint"]["url"])
    assert f"export done step=3 url={root}/export/{STEP}" in result.stdout
    assert "spatial_merger=fresh" in result.stdout
    check_export(root / "export" / STEP, root, spec)
    assert not [p.name for p in (root / "export").iterdir() if p.name != STEP]  # no temporary left


@pytest.mark.slow
def test_export_needs_the_vggt_aggregator(job, tmp_path):
    """JanusVLN's loader has no other source for VGGT: a model.vggt without aggregator.* is refused."""
    from safetensors.torch import save_file

    from janus_job.models.janusvln.export import write_export

    spec = yaml.safe_load(job.read_text())
    root = Path(spec["training"]["checkpoint"]["url"])
    if not (root / STEP / "COMPLETE").exists():
        result = janus_job("train", "--spec", str(job))
        assert result.returncode == 0, result.stdout + result.stderr
    headless = tmp_path / "heads.safetensors"
    save_file({"camera_head.weight": torch.zeros(2)}, headless)
    with pytest.raises(JobError, match=r"model.vggt .*heads.safetensors has no aggregator\.\* tensors"):
        write_export(str(root / STEP), spec["model"]["qwen"], str(headless), str(tmp_path),
                     progress=lambda line: None)


@pytest.mark.slow
def test_cli_exports_a_zero3_checkpoint_of_two_ranks(job, tmp_path):
    spec = yaml.safe_load(job.read_text())
    spec["training"].update(gpus_per_node=2, global_batch_size=4, export=False)
    spec["training"]["checkpoint"].update(url=str(tmp_path / "checkpoints"), interval_steps=3)  # no export: save step 3
    spec["deepspeed"]["zero_stage"] = 3
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = subprocess.run(worker.trainer_command(2, spec_path), cwd=worker.REPO, capture_output=True, text=True,
                            env=worker.trainer_env(tmp_path / "trace-{rank}.jsonl", tmp_path / "staging"),
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert not (tmp_path / "checkpoints" / "export").exists()  # training.export: false
    out = tmp_path / "exported"
    result = janus_job("export", str(spec_path), "--step", "3", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "saved at world size 2, ZeRO-3" in result.stdout and "export done step=3" in result.stdout
    check_export(out, tmp_path / "checkpoints", spec)


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

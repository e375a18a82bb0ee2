"""training.precision: fp8 (janus_job.models.janusvln.fp8): which linears are converted, that a converted
model computes what the bf16 one does within float8's rounding, the device rule, and the real trainer
with float8 linears under DeepSpeed ZeRO-2 and ZeRO-3 at two ranks, checkpointed and exported.

torchao's float8 casts and `torch._scaled_mm` also run on the CPU, so all of this runs in CI; speed
and the loss curves on a GPU are bench/fp8.py's and bench/step_profile.py's (docs/performance.md).
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import ckpt_worker as worker
import pytest
import torch
import yaml

from janus_job.errors import JobError
from janus_job.models.janusvln.fp8 import check_fp8_device, convert_to_fp8, fp8_converted, fp8_targets

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# float8 (e4m3: 3 mantissa bits) on two inner layers of the tiny model: the mean relative loss
# difference of a step against the same model unconverted stays under this
LOSS_TOLERANCE = 0.02


def tiny_model(layers: int = 4):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from janus_job.demo.tiny import tiny_qwen_config, tiny_tokenizer

    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(tiny_qwen_config(tiny_tokenizer(), text_layers=layers))


def test_only_the_inner_decoder_layers_projections_are_converted():
    model = tiny_model(layers=4)
    language = model.model.language_model
    before = {name: p for name, p in model.named_parameters()}
    names = convert_to_fp8(language, "tensorwise")
    assert names == sorted(f"layers.{i}.{p}" for i in (1, 2) for p in PROJECTIONS)
    assert sorted(fp8_converted(language)) == names
    # the first and last layer, the embedding, the LM head and the whole vision side stay plain
    assert not any(name.startswith(("layers.0.", "layers.3.")) for name in names)
    assert type(model.lm_head) is torch.nn.Linear and type(language.embed_tokens) is torch.nn.Embedding
    assert not fp8_converted(model.model.visual)
    # the same Parameter objects: optimizer groups, ZeRO partitions and checkpoints see no change
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in after)
    assert list(model.state_dict()) == list(tiny_model(layers=4).state_dict())


def test_linears_whose_dimensions_are_not_multiples_of_16_stay_plain():
    model = tiny_model(layers=3)
    language = model.model.language_model
    language.layers[1].mlp.up_proj = torch.nn.Linear(64, 120)  # 120 % 16 != 0
    assert "layers.1.mlp.up_proj" not in fp8_targets(language)
    assert "layers.1.mlp.gate_proj" in fp8_targets(language)


def test_an_unknown_recipe_is_refused_naming_the_field():
    with pytest.raises(JobError, match=r"training.fp8_recipe: 'blockwise' is not one of tensorwise, rowwise"):
        convert_to_fp8(tiny_model().model.language_model, "blockwise")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_a_converted_model_trains_like_the_bf16_one(recipe):
    """Same weights, same batch: loss and gradients of the float8 model against the plain one."""
    plain = tiny_model(layers=6).to(torch.bfloat16)
    fp8 = copy.deepcopy(plain)
    assert len(convert_to_fp8(fp8.model.language_model, recipe)) == 4 * len(PROJECTIONS)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 200, (2, 48), generator=generator)
    losses = []
    for model in (plain, fp8):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.item())
    assert abs(losses[1] - losses[0]) / losses[0] < LOSS_TOLERANCE, losses
    for (name, a), (_, b) in zip(plain.named_parameters(), fp8.named_parameters(), strict=True):
        if a.grad is None:
            continue
        cosine = torch.nn.functional.cosine_similarity(a.grad.float().flatten(), b.grad.float().flatten(), dim=0)
        assert cosine > 0.95, (name, float(cosine))


def test_a_gpu_without_float8_tensor_cores_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(JobError) as err:
        check_fp8_device(torch.device("cuda", 0))
    assert str(err.value) == ("training.precision: fp8 needs float8 tensor cores (compute capability 8.9+: L40S, "
                              "H100, H200, B200); NVIDIA A100-SXM4-80GB has 8.0; set training.precision: bf16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(torch.device("cuda", 0))
    check_fp8_device(torch.device("cpu"))


def test_the_spec_takes_precision_and_recipe(tmp_path):
    from janus_job.config.load import validate_spec
    from janus_job.config.spec import TrainingSpec

    assert TrainingSpec.model_fields["precision"].default == "bf16"
    spec = validate_spec({"name": "fp8", "model": {"qwen": "/models/qwen", "vggt": "/models/vggt"},
                          "data": {"annotations": "/data/a.json", "image_root": "/data/images"},
                          "features": {"store": "/store"},
                          "training": {"precision": "fp8", "fp8_recipe": "rowwise",
                                       "checkpoint": {"url": "/checkpoints"}}})
    assert (spec.training.precision, spec.training.fp8_recipe) == ("fp8", "rowwise")


@pytest.fixture(scope="module")
def fp8_job(tmp_path_factory) -> Path:
    from janus_job.demo.run import precompute_features, prepare_job

    root = tmp_path_factory.mktemp("fp8-job")
    spec_path = prepare_job(root, steps=3, gpu=False, micro_batch_size=1, global_batch_size=4)
    spec = yaml.safe_load(spec_path.read_text())
    spec["training"].update(gpus_per_node=2, precision="fp8")
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    precompute_features(spec_path)
    return spec_path


@pytest.mark.slow
@pytest.mark.parametrize("stage,recipe", [(2, "tensorwise"), (3, "rowwise")])
def test_the_trainer_runs_fp8_under_deepspeed_and_exports_plain_weights(fp8_job, tmp_path, stage, recipe):
    """The product trainer (torchrun, 2 CPU ranks) with float8 decoder linears under ZeRO-2 and ZeRO-3:
    trains, checkpoints and ends with an export whose weights equal DeepSpeed's consolidation of the
    checkpoint (the float8 modules leave no trace in checkpoint or export)."""
    from test_export import check_export

    spec = yaml.safe_load(fp8_job.read_text())
    spec["training"]["fp8_recipe"] = recipe
    spec["training"]["checkpoint"]["url"] = str(tmp_path / "checkpoints")
    spec["deepspeed"]["zero_stage"] = stage
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(worker.trainer_command(2, spec_path), cwd=worker.REPO, capture_output=True, text=True,
                            env=worker.trainer_env(tmp_path / "trace-{rank}.jsonl", tmp_path / "staging"))
    out = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert f"precision=fp8/{recipe}" in result.stdout and f"zero={stage}" in result.stdout
    losses = [float(line.split("loss=")[1].split()[0]) for line in result.stdout.splitlines()
              if line.startswith("train step=")]
    assert losses and all(loss == loss and 0 < loss < 50 for loss in losses), losses
    assert "outlive the process groups" not in out
    export = tmp_path / "checkpoints" / "export" / "step-00000003"
    check_export(export, tmp_path / "checkpoints", spec)

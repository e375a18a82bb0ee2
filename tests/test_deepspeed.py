"""DeepSpeed renderer: concrete numbers, every refusal rule, and loading in real DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import JANUS_JOB

from janus_job.config.deepspeed import render_deepspeed_config
from janus_job.config.load import load_spec, validate_spec
from janus_job.config.spec import JobSpec
from janus_job.errors import JobError

ROOT = Path(__file__).resolve().parent.parent

BASE = {
    "name": "ds-test",
    "model": {"qwen": "/models/qwen", "vggt": "/models/vggt"},
    "data": {"annotations": "/data/a.json", "image_root": "/data/images"},
    "features": {"store": "/features"},
    "training": {"nodes": 2, "checkpoint": {"url": "/ckpt"}},
}


def make(**sections) -> JobSpec:
    """A structurally valid spec with `sections` merged over BASE (no cross-field checks)."""
    data = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return JobSpec.model_validate(data)


def _walk(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _walk(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _walk(v)
    else:
        yield tree


def test_batch_numbers_are_concrete_and_consistent():
    spec = make(
        training={"nodes": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 4, "checkpoint": {"url": "/c"}}
    )
    config = render_deepspeed_config(spec, spec.world_size)
    assert "auto" not in list(_walk(config))
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 2 * 4 * 16
    assert config["zero_optimization"]["stage"] == 1
    assert config["bf16"] == {"enabled": True}
    assert "optimizer" not in config  # default deepspeed.optimizer: torch, built by the trainer
    with_section = render_deepspeed_config(make(deepspeed={"optimizer": "deepspeed"}), 8)
    assert with_section["optimizer"]["params"]["lr"] == 2e-5


def test_resize_keeps_global_batch_and_adjusts_accumulation():
    spec = make(
        training={
            "nodes": 2,
            "global_batch_size": 64,
            "checkpoint": {"url": "/c"},
            "resize": {"min_nodes": 1, "max_nodes": 4},
        }
    )
    for world, accum in ((8, 8), (16, 4), (32, 2)):
        config = render_deepspeed_config(spec, world)
        assert config["train_batch_size"] == 64
        assert config["gradient_accumulation_steps"] == accum
    with pytest.raises(JobError, match="global_batch_size.*world size 24"):
        render_deepspeed_config(spec, 24)


def test_stage3_renders_its_knobs_and_param_offload():
    spec = make(
        deepspeed={
            "zero_stage": 3,
            "offload_param": "cpu",
            "offload_optimizer": "cpu",
            "optimizer": "deepspeed",
            "stage3": {"prefetch_bucket_size": 1234},
        }
    )
    zero = render_deepspeed_config(spec, 16)["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 1234
    assert zero["stage3_max_live_parameters"] == 1_000_000_000
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "allgather_bucket_size" not in zero


def test_extra_config_is_merged():
    spec = make(
        deepspeed={
            "extra_config": {"zero_optimization": {"round_robin_gradients": True}, "comms_logger": {"enabled": False}}
        }
    )
    config = render_deepspeed_config(spec, 16)
    assert config["zero_optimization"]["round_robin_gradients"] is True
    assert config["zero_optimization"]["stage"] == 1
    assert config["comms_logger"] == {"enabled": False}


RULES = [
    (
        "param offload below stage 3",
        {"deepspeed": {"zero_stage": 2, "offload_param": "cpu"}},
        "deepspeed.offload_param",
        "zero_stage: 3",
    ),
    (
        "param offload below stage 3 via extra_config",
        {"deepspeed": {"extra_config": {"zero_optimization": {"offload_param": {"device": "cpu"}}}}},
        "deepspeed.extra_config.zero_optimization.offload_param",
        "zero_stage: 3",
    ),
    (
        "activation_checkpointing block",
        {"deepspeed": {"extra_config": {"activation_checkpointing": {"partition_activations": True}}}},
        "deepspeed.extra_config.activation_checkpointing",
        "training.gradient_checkpointing",
    ),
    (
        "optimizer offload without optimizer section",
        {"deepspeed": {"offload_optimizer": "cpu", "optimizer": "torch"}},
        "deepspeed.offload_optimizer",
        "optimizer: deepspeed",
    ),
    (
        "optimizer offload at stage 0",
        {"deepspeed": {"offload_optimizer": "cpu", "zero_stage": 0, "optimizer": "deepspeed"}},
        "deepspeed.offload_optimizer",
        "zero_stage: 2",
    ),
    (
        "stage-3 knob in the spec at stage 2",
        {"deepspeed": {"stage3": {"max_live_parameters": 10}}},
        "deepspeed.stage3.max_live_parameters",
        "zero_stage: 3",
    ),
    (
        "stage-3 key in extra_config at stage 1",
        {"deepspeed": {"zero_stage": 1, "extra_config": {"zero_optimization": {"stage3_prefetch_bucket_size": 5}}}},
        "deepspeed.extra_config.zero_optimization.stage3_prefetch_bucket_size",
        "zero_stage: 3",
    ),
    (
        "extra_config overrides a spec value",
        {"deepspeed": {"extra_config": {"train_batch_size": 999}}},
        "deepspeed.extra_config.train_batch_size",
        "training.global_batch_size",
    ),
    (
        "extra_config changes the stage",
        {"deepspeed": {"extra_config": {"zero_optimization": {"stage": 3}}}},
        "deepspeed.extra_config.zero_optimization.stage",
        "deepspeed.zero_stage",
    ),
    (
        "auto left in extra_config",
        {"deepspeed": {"extra_config": {"zero_optimization": {"sub_group_size": "auto"}}}},
        "deepspeed.extra_config.zero_optimization.sub_group_size",
        "concrete value",
    ),
    (
        "fp16 and bf16 together",
        {"deepspeed": {"extra_config": {"fp16": {"enabled": True}}}},
        "deepspeed.extra_config.fp16",
        "remove fp16",
    ),
    (
        "DeepSpeed scheduler",
        {"deepspeed": {"extra_config": {"scheduler": {"type": "WarmupLR"}}}},
        "deepspeed.extra_config.scheduler",
        "training.scheduler",
    ),
]


@pytest.mark.parametrize("case,sections,field,fix", RULES, ids=[r[0] for r in RULES])
def test_refusal_rule(case, sections, field, fix):
    spec = make(**sections)
    with pytest.raises(JobError) as err:
        render_deepspeed_config(spec, spec.world_size)
    message = str(err.value)
    assert f"{field}:" in message and fix in message, message
    # validate_spec applies the same rule, so `janus-job validate` refuses the file too
    with pytest.raises(JobError, match=field.replace(".", r"\.")):
        validate_spec(spec.model_dump(mode="json", exclude_none=True))


DEEPSPEED_LOADER = textwrap.dedent("""
    import json, os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig
    from janus_job.train.distributed import skip_cpu_shm_collectives
    skip_cpu_shm_collectives()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)

    class DataParallelOf:  # the mpu interface: DeepSpeedConfig takes the data-parallel size from it
        def __init__(self, n): self.n = n
        def get_data_parallel_world_size(self): return self.n

    results = []
    for path, world in json.loads(sys.argv[1]):
        try:
            cfg = DeepSpeedConfig(json.load(open(path)), mpu=DataParallelOf(world))
            results.append({"ok": True, "world": cfg.world_size, "train_batch_size": cfg.train_batch_size,
                            "micro": cfg.train_micro_batch_size_per_gpu,
                            "accumulation": cfg.gradient_accumulation_steps,
                            "stage": cfg.zero_optimization_stage, "bf16": cfg.bfloat16_config.enabled,
                            "offload_optimizer": cfg.zero_config.offload_optimizer is not None})
        except Exception as err:
            results.append({"ok": False, "error": f"{type(err).__name__}: {err}"})
    print("RESULTS " + json.dumps(results))
""")


@pytest.mark.slow
def test_rendered_configs_load_in_real_deepspeed(tmp_path):
    from conftest import free_port

    # the acceptance path: `janus-job render examples/r2r-2node-ib.yaml --out DIR` -> DIR/deepspeed.json
    out = tmp_path / "rendered"
    proc = subprocess.run([*JANUS_JOB, "render", str(ROOT / "examples" / "r2r-2node-ib.yaml"),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifests.yaml").is_file()
    r2r = load_spec(ROOT / "examples" / "r2r-2node-ib.yaml")
    offload = make(
        deepspeed={"zero_stage": 3, "offload_param": "cpu", "offload_optimizer": "cpu", "optimizer": "deepspeed"}
    )
    (tmp_path / "r2r8.json").write_text(json.dumps(render_deepspeed_config(r2r, 8)))
    (tmp_path / "offload16.json").write_text(json.dumps(render_deepspeed_config(offload, 16)))
    cases = [
        (str(out / "deepspeed.json"), 16),
        (str(tmp_path / "r2r8.json"), 8),
        (str(tmp_path / "offload16.json"), 16),
        (str(out / "deepspeed.json"), 8),
    ]  # a 16-rank config at 8 ranks must be refused by DeepSpeed
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_LOADER, json.dumps(cases), str(free_port())],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    r16, r8, off, wrong = json.loads(line[0][len("RESULTS ") :])
    assert r16 == {
        "ok": True,
        "world": 16,
        "train_batch_size": 96,
        "micro": 1,
        "accumulation": 6,
        "stage": 1,
        "bf16": True,
        "offload_optimizer": False,
    }, r16
    assert r8["ok"] and r8["world"] == 8 and r8["train_batch_size"] == 96 and r8["accumulation"] == 12, r8
    assert off["ok"] and off["stage"] == 3 and off["offload_optimizer"], off
    assert not wrong["ok"], wrong
    assert "batch" in wrong["error"].lower(), wrong


ADAM = {"adam_beta1": 0.85, "adam_beta2": 0.95, "adam_epsilon": 1e-6}  # none of them the default

ENGINE_OPTIMIZER = textwrap.dedent("""
    import json, os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed, torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from janus_job.config.deepspeed import render_deepspeed_config
    from janus_job.config.spec import JobSpec
    from janus_job.train.distributed import skip_cpu_shm_collectives
    from janus_job.train.engine import build_engine
    skip_cpu_shm_collectives()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch_spec, deepspeed_spec = (JobSpec.model_validate(s) for s in json.loads(sys.argv[1]))
    engine, _ = build_engine(torch_spec, torch.nn.Linear(4, 4), world_size=1, total_steps=4)
    adamw = engine.optimizer.optimizer  # the torch optimizer under DeepSpeed's ZeRO wrapper
    parsed = DeepSpeedConfig(render_deepspeed_config(deepspeed_spec, 1))  # what DeepSpeed builds its AdamW from
    print("RESULTS " + json.dumps({"type": type(adamw).__module__ + "." + type(adamw).__name__,
                                   "groups": [[list(g["betas"]), g["eps"]] for g in adamw.param_groups],
                                   "deepspeed": [parsed.optimizer_name, parsed.optimizer_params]}))
""")


@pytest.mark.slow
def test_adam_betas_and_eps_reach_both_optimizers(tmp_path):
    """training.adam_beta1/adam_beta2/adam_epsilon reach torch's AdamW that build_engine hands DeepSpeed
    (deepspeed.optimizer: torch) and the optimizer section DeepSpeed builds its own from (deepspeed)."""
    from conftest import free_port

    torch_spec = make(training=ADAM, deepspeed={"bf16": False, "optimizer": "torch"})
    deepspeed_spec = make(training=ADAM, deepspeed={"optimizer": "deepspeed"})
    assert "optimizer" not in render_deepspeed_config(torch_spec, 1)
    specs = [s.model_dump(mode="json", exclude_none=True) for s in (torch_spec, deepspeed_spec)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", ENGINE_OPTIMIZER, json.dumps(specs), str(free_port())],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(line[0][len("RESULTS "):])
    assert r["type"] == "torch.optim.adamw.AdamW", r
    assert r["groups"] and all(group == [[0.85, 0.95], 1e-6] for group in r["groups"]), r
    name, params = r["deepspeed"]
    assert name == "adamw" and params["betas"] == [0.85, 0.95] and params["eps"] == 1e-6, r

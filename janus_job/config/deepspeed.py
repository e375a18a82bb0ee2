"""Spec -> a complete DeepSpeed config with concrete numbers, and the combinations it refuses."""

from __future__ import annotations

import copy
from typing import Any

from janus_job.config.spec import JobSpec
from janus_job.errors import JobError, Problem

# Documented ZeRO-3 defaults of DeepSpeed, written out so the rendered file says what runs.
STAGE3_DEFAULTS = {
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_gather_16bit_weights_on_model_save": False,
}
STEPS_PER_PRINT = 1_000_000_000  # the trainer prints its own log line; keep DeepSpeed's quiet

# keys of the rendered config owned by a spec field: extra_config may not change them
OWNED_KEYS = {
    ("train_batch_size",): "training.global_batch_size",
    ("train_micro_batch_size_per_gpu",): "training.micro_batch_size",
    ("gradient_accumulation_steps",): "training.gradient_accumulation_steps / training.global_batch_size",
    ("gradient_clipping",): "deepspeed.gradient_clipping",
    ("bf16", "enabled"): "deepspeed.bf16",
    ("zero_optimization", "stage"): "deepspeed.zero_stage",
    ("zero_optimization", "overlap_comm"): "deepspeed.overlap_comm",
    ("zero_optimization", "contiguous_gradients"): "deepspeed.contiguous_gradients",
    ("zero_optimization", "reduce_bucket_size"): "deepspeed.reduce_bucket_size",
    ("zero_optimization", "allgather_bucket_size"): "deepspeed.allgather_bucket_size",
    ("optimizer", "params", "lr"): "training.learning_rate",
    ("optimizer", "params", "weight_decay"): "training.weight_decay",
}
STAGE3_SPEC_FIELDS = {
    "prefetch_bucket_size": "stage3_prefetch_bucket_size",
    "param_persistence_threshold": "stage3_param_persistence_threshold",
    "max_live_parameters": "stage3_max_live_parameters",
    "max_reuse_distance": "stage3_max_reuse_distance",
    "gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
}
STAGE3_ONLY_ZERO_KEYS = set(STAGE3_DEFAULTS) | {
    "offload_param",
    "sub_group_size",
    "stage3_module_granularity_threshold",
    "zero_hpz_partition_size",
    "zero_quantized_weights",
    "mics_shard_size",
}


def _base_config(spec: JobSpec, world_size: int) -> dict[str, Any]:
    ds, t = spec.deepspeed, spec.training
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage in (1, 2):
        zero.update(allgather_partitions=True, allgather_bucket_size=ds.allgather_bucket_size, reduce_scatter=True)
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        for field, key in STAGE3_SPEC_FIELDS.items():
            value = getattr(ds.stage3, field)
            zero[key] = STAGE3_DEFAULTS[key] if value is None else value
        if ds.offload_param == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": spec.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": spec.accumulation_for(world_size),
        "gradient_clipping": ds.gradient_clipping,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": ds.bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
    }
    if ds.optimizer == "deepspeed":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": t.learning_rate,
                "betas": [t.adam_beta1, t.adam_beta2],
                "eps": t.adam_epsilon,
                "weight_decay": t.weight_decay,
            },
        }
    return config


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.extend(_leaves(value, prefix + (key,)))
        else:
            out.append((prefix + (key,), value))
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _offloaded(section: Any) -> bool:
    return isinstance(section, dict) and section.get("device", "none") not in ("none", None)


def _rule_problems(spec: JobSpec, config: dict[str, Any]) -> list[Problem]:
    ds = spec.deepspeed
    problems: list[Problem] = []
    extra = ds.extra_config
    for section in ("zero_optimization", "bf16", "fp16"):
        if section in extra and not isinstance(extra[section], dict):
            problems.append(
                Problem(
                    f"deepspeed.extra_config.{section}",
                    "must be a mapping",
                    "write it as key: value lines, as in DeepSpeed's config",
                )
            )
    if problems:
        return problems
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)

    for path, value in _leaves(extra):
        if path in OWNED_KEYS or (path[:1] == ("zero_optimization",) and path[1:2] == ("stage",)):
            owner = OWNED_KEYS.get(path, "deepspeed.zero_stage")
            problems.append(
                Problem(
                    "deepspeed.extra_config." + ".".join(path),
                    f"sets a value the spec determines ({owner})",
                    f"remove it from extra_config and set {owner} instead",
                )
            )
        elif value == "auto":
            problems.append(
                Problem(
                    "deepspeed.extra_config." + ".".join(path),
                    "is 'auto'; nothing fills it in (there is no HF Trainer)",
                    "give a concrete value or remove the key",
                )
            )

    if ds.offload_param == "cpu" and ds.zero_stage < 3:
        problems.append(
            Problem(
                "deepspeed.offload_param",
                f"parameter offload only exists in ZeRO-3; at zero_stage {ds.zero_stage} DeepSpeed ignores it "
                "(a ZeRO-2 config with offload_param silently keeps every parameter on the GPU)",
                "set deepspeed.offload_param: none, or deepspeed.zero_stage: 3",
            )
        )
    elif stage < 3 and _offloaded(zero.get("offload_param")):
        problems.append(
            Problem(
                "deepspeed.extra_config.zero_optimization.offload_param",
                f"parameter offload only exists in ZeRO-3 (zero_stage is {stage})",
                "remove it, or set deepspeed.zero_stage: 3 and deepspeed.offload_param: cpu",
            )
        )

    if "activation_checkpointing" in config:
        problems.append(
            Problem(
                "deepspeed.extra_config.activation_checkpointing",
                "is ineffective: the model recomputes activations with Hugging Face gradient checkpointing, "
                "which never calls deepspeed.checkpointing",
                "remove the block; training.gradient_checkpointing controls recomputation",
            )
        )

    if _offloaded(zero.get("offload_optimizer")):
        if "optimizer" not in config:
            problems.append(
                Problem(
                    "deepspeed.offload_optimizer",
                    "optimizer offload needs DeepSpeed to build the optimizer (CPU Adam) from an optimizer section; "
                    "with deepspeed.optimizer 'torch' the GPU optimizer would be handed host tensors",
                    "set deepspeed.optimizer: deepspeed, or deepspeed.offload_optimizer: none",
                )
            )
        if stage == 0:
            problems.append(
                Problem(
                    "deepspeed.offload_optimizer",
                    "optimizer offload needs ZeRO stage 1-3 (zero_stage is 0)",
                    "set deepspeed.zero_stage: 2 (or 1/3), or deepspeed.offload_optimizer: none",
                )
            )

    if stage < 3:
        set_knobs = [f for f in STAGE3_SPEC_FIELDS if getattr(ds.stage3, f) is not None]
        for field in set_knobs:
            problems.append(
                Problem(
                    f"deepspeed.stage3.{field}",
                    f"is a ZeRO-3 setting; zero_stage is {stage}",
                    "remove it, or set deepspeed.zero_stage: 3",
                )
            )
        for key in sorted(set(zero) & (STAGE3_ONLY_ZERO_KEYS - {"offload_param"})):
            problems.append(
                Problem(
                    f"deepspeed.extra_config.zero_optimization.{key}",
                    f"is a ZeRO-3 setting; zero_stage is {stage}",
                    "remove it, or set deepspeed.zero_stage: 3",
                )
            )

    if config.get("fp16", {}).get("enabled") is True and config.get("bf16", {}).get("enabled") is True:
        problems.append(
            Problem(
                "deepspeed.extra_config.fp16",
                "fp16 and bf16 cannot both be enabled",
                "remove fp16 from extra_config (janus-train trains in bf16)",
            )
        )
    if "scheduler" in config:
        problems.append(
            Problem(
                "deepspeed.extra_config.scheduler",
                "the trainer builds the learning-rate schedule from training.scheduler/warmup_ratio; "
                "a DeepSpeed scheduler would run twice",
                "remove it and use training.scheduler and training.warmup_ratio",
            )
        )
    return problems


def deepspeed_problems(spec: JobSpec, world_size: int | None = None) -> list[Problem]:
    """The refusal rules for the config this spec renders at `world_size` (default: the spec's)."""
    try:
        base = _base_config(spec, world_size or spec.world_size)
    except JobError as err:
        return [Problem("training.global_batch_size", str(err), "see above")]
    return _rule_problems(spec, _merge(base, spec.deepspeed.extra_config))


def render_deepspeed_config(spec: JobSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for `world_size` ranks; the global batch stays the spec's."""
    base = _base_config(spec, world_size)  # JobError when the global batch cannot be kept
    config = _merge(base, spec.deepspeed.extra_config)
    problems = _rule_problems(spec, config)
    if problems:
        raise JobError("the DeepSpeed settings are refused:\n" + "\n".join(str(p) for p in problems))
    return config

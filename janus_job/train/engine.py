"""The training step the trainer and the benchmarks share: parameter groups, optimizer, lr schedule,
`deepspeed.initialize` with the rendered config, and one micro-step (forward, backward, step).

`build_engine(spec, model, world_size, total_steps)` makes the DeepSpeed engine; `micro_step(engine,
batch, device)` trains one micro-batch on it (DeepSpeed steps the optimizer and the schedule at the
accumulation boundary). What the trainer runs is exactly this, so a benchmark calling these
functions measures the product's step.
"""

from __future__ import annotations

import math
from typing import Any

from janus_job.errors import JobError

# ---------------------------------------------------------------- parameter groups


def param_groups(model, lr: float, merger_lr: float | None = None, vision_lr: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """JanusVLN's optimizer groups: names with `merger` (vision and spatial) at merger_lr, other
    `visual` parameters at vision_lr, the rest (LLM) at lr; no weight decay on biases."""
    groups: dict[tuple[str, bool], list] = {}
    names: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "merger" in name and merger_lr:
            kind = "merger"
        elif "visual" in name and vision_lr:
            kind = "vision"
        else:
            kind = "llm"
        decay = "bias" not in name
        groups.setdefault((kind, decay), []).append(param)
        names.setdefault((kind, decay), []).append(name)
    rates = {"llm": lr, "merger": merger_lr, "vision": vision_lr}
    return [
        {"params": params, "lr": rates[kind], "weight_decay": weight_decay if decay else 0.0,
         "name": f"{kind}{'' if decay else '_no_decay'}", "param_names": names[(kind, decay)]}
        for (kind, decay), params in sorted(groups.items())
    ]


# ---------------------------------------------------------------- schedule


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of every group's base lr at optimizer step `step` (0-based), as transformers'
    get_scheduler computes it (what JanusVLN trains with): linear warmup from 0 at step 0, then
    cosine to 0, linear to 0, or constant."""
    if step < warmup_steps:
        return step / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise JobError(f"training.scheduler {kind!r} is not cosine, linear or constant")


def warmup_steps_for(spec: Any, total_steps: int) -> int:
    """Warmup optimizer steps: training.warmup_ratio of the run, rounded up."""
    return math.ceil(spec.training.warmup_ratio * total_steps)


# ---------------------------------------------------------------- engine


def build_engine(spec: Any, model: Any, world_size: int, total_steps: int, *,
                 accumulation: int | None = None, config: dict | None = None) -> tuple[Any, dict]:
    """The DeepSpeed engine of `model` for `spec` at `world_size` ranks, and its config.

    The config is `render_deepspeed_config(spec, world_size)` unless `config` is given (a caller
    that already rendered it). Where the config names no optimizer, torch's AdamW runs (fused on
    CUDA: one multi-tensor kernel, nothing to compile) over JanusVLN's parameter groups; the lr
    schedule is `lr_factor` over `total_steps`. `accumulation`, when given, must equal the config's
    (the sampler's accumulation and DeepSpeed's must agree or steps would not line up).
    """
    import deepspeed
    import torch

    from janus_job.config.deepspeed import render_deepspeed_config

    t = spec.training
    config = config if config is not None else render_deepspeed_config(spec, world_size)
    if accumulation is not None and config["gradient_accumulation_steps"] != accumulation:
        raise JobError(
            f"internal: DeepSpeed accumulation {config['gradient_accumulation_steps']} differs from the "
            f"sampler's {accumulation}"
        )
    groups = param_groups(model, t.learning_rate, t.merger_learning_rate, t.vision_learning_rate,
                          weight_decay=t.weight_decay)
    optimizer = None
    if "optimizer" not in config:
        optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                      eps=t.adam_epsilon, weight_decay=t.weight_decay,
                                      fused=torch.cuda.is_available())
    schedule = dict(total_steps=total_steps, warmup_steps=warmup_steps_for(spec, total_steps), kind=t.scheduler)

    def scheduler(opt: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, **schedule))

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups if optimizer is None else None,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=config,
        dist_init_required=False,
    )
    return engine, config


# ---------------------------------------------------------------- the step


# small per-image metadata the forward reads on the host (sizes, counts): copying it to the GPU would
# cost a device synchronisation at every read
HOST_KEYS = frozenset({"image_grid_thw", "images_per_sample"})


def to_device(batch: dict, device: Any) -> dict:
    """The batch's tensors (and lists of tensors) on `device`, copied without blocking; HOST_KEYS stay."""
    import torch

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            return [v.to(device, non_blocking=True) for v in value]
        return value

    return {key: value if key in HOST_KEYS else move(value) for key, value in batch.items()}


class _NoClock:
    def start(self, phase: str) -> None:
        pass

    def stop(self, phase: str) -> None:
        pass


def micro_step(engine: Any, batch: dict, device: Any, *, clip_mode: str = "sum", clock: Any = None,
               **forward_options: Any) -> Any:
    """Forward, backward and (at the accumulation boundary) the optimizer step of one micro-batch.

    clip_mode "sum" (training.clip_mode) backpropagates the micro-batch loss unscaled
    (`scale_wrt_gas=False`), as HF Trainer does with DeepSpeed for JanusVLN: the optimizer step sees
    the sum of the micro-batch gradients, which DeepSpeed clips at gradient_clipping, and AdamW
    gets exactly the reference's clipped gradient (eps included). "mean" divides by the
    accumulation first (DeepSpeed's default).

    Returns the model's output; its `loss` is what was backpropagated (a device tensor: no host
    sync here). `clock`, when given, is told where each phase starts and stops
    (`clock.start(phase)` / `clock.stop(phase)` for "forward", "backward", "optimizer_step"): the
    step benchmark times the product's step this way. `forward_options` go to the model's forward.
    """
    clock = clock or _NoClock()
    batch = to_device(batch, device)
    clock.start("forward")
    output = engine(**batch, **forward_options)
    clock.stop("forward")
    clock.start("backward")
    engine.backward(output.loss, scale_wrt_gas=clip_mode != "sum")
    clock.stop("backward")
    clock.start("optimizer_step")
    engine.step()
    clock.stop("optimizer_step")
    return output

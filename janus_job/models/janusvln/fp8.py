"""FP8 training of the language model's decoder linears (`training.precision: fp8`).

torchao's float8 training (`torchao.float8`) swaps an `nn.Linear` for a `Float8Linear` that casts
its input, weight and output gradient to float8 in every forward and backward and multiplies with
`torch._scaled_mm`; the weight stays the same bf16 `nn.Parameter`, so the optimizer, DeepSpeed's
ZeRO partitions, checkpoints and the export see exactly what they see in bf16. Two scaling recipes:
`tensorwise` (one scale per tensor) and `rowwise` (one per row: finer, a little more work).

What is converted: the q/k/v/o and MLP projections of decoder layers 1..L-2, where both
dimensions are multiples of 16 (what `_scaled_mm` requires; the trainer pads each micro-batch's
token count to a multiple of 16 as well, `FP8_MULTIPLE`). The embedding, the LM head, the
vision tower and both mergers and the first and last decoder layer stay bf16: the layers nearest
the input and the output are where float8's rounding costs the most accuracy for the least time.
Convert before `torch.compile`: compile fuses the casts and scales into the surrounding kernels.
"""

from __future__ import annotations

from typing import Any

from janus_job.errors import JobError

FP8_RECIPES = ("tensorwise", "rowwise")
FP8_MULTIPLE = 16  # `_scaled_mm` wants every dimension divisible by 16: the token count too (data.JanusCollator)
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9) and Hopper (9.0) onwards


def check_fp8_device(device: Any) -> None:
    """Refuses a GPU without float8 tensor cores (CPU runs it functionally, for tests and the demo)."""
    import torch

    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise JobError(
            f"training.precision: fp8 needs float8 tensor cores (compute capability 8.9+: L40S, H100, H200, B200); "
            f"{name} has {capability[0]}.{capability[1]}; set training.precision: bf16"
        )


def fp8_targets(language_model: Any) -> list[str]:
    """Names (relative to `language_model`) of the linears `convert_to_fp8` converts."""
    import torch

    last = len(language_model.layers) - 1
    names = []
    for name, module in language_model.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "layers" or not isinstance(module, torch.nn.Linear):
            continue
        index = int(parts[1])
        if 0 < index < last and module.in_features % FP8_MULTIPLE == 0 and module.out_features % FP8_MULTIPLE == 0:
            names.append(name)
    return names


def convert_to_fp8(language_model: Any, recipe: str = "tensorwise") -> list[str]:
    """Swaps the decoder linears `fp8_targets` names for torchao Float8Linear modules of `recipe`
    (in place; the weights are the same Parameter objects); returns their names."""
    if recipe not in FP8_RECIPES:
        raise JobError(f"training.fp8_recipe: {recipe!r} is not one of {', '.join(FP8_RECIPES)}")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise JobError(f"training.precision: fp8 needs torchao ({err}); install janus-train with its pinned "
                       "dependencies (constraints.txt) or set training.precision: bf16") from err
    targets = set(fp8_targets(language_model))
    if not targets:
        return []
    config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(language_model, config=config, module_filter_fn=lambda _, name: name in targets)
    return sorted(targets)


def fp8_converted(language_model: Any) -> list[str]:
    """Names of the Float8Linear modules in `language_model` (empty in a bf16 model)."""
    return [name for name, module in language_model.named_modules() if type(module).__name__ == "Float8Linear"]

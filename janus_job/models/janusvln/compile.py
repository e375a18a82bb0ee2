"""Regional compilation of the language model's decoder layers (`training.compile`).

A compiled decoder layer computes the same function as the eager one (to bf16 rounding) with
fewer, fused kernels; docs/performance.md has the measurement that made it an option.
"""

from __future__ import annotations

from typing import Any


def compile_decoder_layers(language_model: Any, dynamic: bool = True, backend: str = "inductor") -> int:
    """Compiles each decoder layer of `language_model` in place (`nn.Module.compile`); returns how many.

    Regional: the layers share one code object, so one graph (with a symbolic sequence length when
    `dynamic`) serves all of them and every sample length; what runs between the layers (embedding,
    mergers, mask, loss) stays eager. The first step pays the compilation. `backend` is torch.compile's
    ("aot_eager" captures the same graphs without generating kernels: the CPU checks use it).
    """
    import torch

    layers = list(language_model.layers)
    # every layer instance may add a cache entry for the shared code; never fall back to eager for that
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(layers) + 8)
    for layer in layers:
        layer.compile(dynamic=dynamic, backend=backend)
    return len(layers)

"""Building JanusVLN: from a Qwen2.5-VL checkpoint and a VGGT checkpoint (paths or fsspec URLs), or
from configs with random weights (tests, benches), frozen encoders, lean activations, checkpointing.
"""

from __future__ import annotations

import contextlib
import os

import torch
from transformers import AutoConfig

from janus_job.errors import JobError
from janus_job.io import local_copy
from janus_job.models.janusvln.lean import make_activation_lean
from janus_job.models.janusvln.model import (
    DEFAULT_LAM,
    SPATIAL_CHANNELS,
    JanusVLNForConditionalGeneration,
    janus_config,
)
from janus_job.models.vggt import FrameCausalAggregator, load_aggregator


def model_from_config(qwen_config, vggt_config=None, dtype=None, device="cpu",
                      attn_implementation: str = "sdpa", gradient_checkpointing: bool = False,
                      lam: float = DEFAULT_LAM, spatial_mode: str = "batched", vggt_dtype=None,
                      spatial_channels: int | None = None, register_vggt: bool = True,
                      lean_activations: bool = True):
    """Random-weight JanusVLN (for tests and benches), initialised directly on `device`.

    spatial_channels defaults to 2 x the VGGT width (2048 for VGGT-1B, also without a VGGT).
    lean_activations=False keeps transformers' own MLP and RMSNorm (JanusVLN as published).
    """
    dtype = dtype or torch.float32
    channels = spatial_channels or _spatial_channels(vggt_config)
    config = janus_config(qwen_config, lam=lam, spatial_channels=channels)
    config._attn_implementation = attn_implementation
    with _default_dtype(dtype), torch.device(device):
        model = JanusVLNForConditionalGeneration(config)
    if vggt_config is not None:
        with _default_dtype(vggt_dtype or torch.float32), torch.device(device):
            model.attach_aggregator(FrameCausalAggregator(vggt_config), mode=spatial_mode,
                                    register=register_vggt)
    return _finish(model, gradient_checkpointing, lean_activations)


@contextlib.contextmanager
def _default_dtype(dtype):
    """Parameters created inside get `dtype` (so a 7B model is never materialised in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _spatial_channels(vggt_config) -> int:
    if vggt_config is None:
        return SPATIAL_CHANNELS
    return 2 * int(vggt_config.embed_dim)


def _finish(model, gradient_checkpointing: bool, lean_activations: bool = True):
    model.freeze_encoders()
    if lean_activations:
        text = model.config.text_config
        expected = 3 * text.num_hidden_layers + 1  # per layer: MLP + 2 norms; the final norm
        switched = make_activation_lean(model.model.language_model)
        if switched != expected:
            raise JobError(
                f"janus_job.models.janusvln.lean switched {switched} of the language model's {expected} "
                "MLP/RMSNorm modules "
                f"(hidden_act {text.hidden_act!r}): this transformers version's Qwen2.5-VL layers are not the "
                "ones it knows, and the memory estimate assumes them; pin the transformers version of "
                "constraints.txt or build the model with lean_activations=False"
            )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for module in model.model.visual.modules():  # frozen blocks keep no activations anyway
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False
    model.config.use_cache = False
    return model


def build_model(
    qwen,
    vggt=None,
    dtype=None,
    device="cpu",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    lam: float = DEFAULT_LAM,
    spatial_mode: str = "batched",
    vggt_dtype=None,
    register_vggt: bool = True,
    vggt_config=None,
    spatial_channels: int | None = None,
    cache_dir: str | None = None,
    lean_activations: bool = True,
    endpoint_url: str | None = None,
):
    """JanusVLN from pretrained weights (paths or fsspec URLs) or from configs (random weights).

    qwen: Qwen2.5-VL-7B-Instruct directory/URL, or a `Qwen2_5_VLConfig` for random weights.
    vggt: VGGT-1B checkpoint path/URL (`janus_job.models.vggt.load_aggregator`), a `VGGTAggregatorConfig`
          (random weights), or None when spatial features always come from the store.
    vggt_config: the aggregator architecture of a vggt checkpoint (default VGGT-1B).
    spatial_channels: channels of cached spatial maps (default: 2 x the VGGT width, else the
          Qwen config's `spatial_channels`, else 2048).
    VGGT keeps fp32 weights by default and runs under bf16 autocast on GPU, as JanusVLN does.
    register_vggt=False keeps it out of the module tree (see attach_aggregator): use it with
    DeepSpeed ZeRO-3, which would otherwise partition and re-gather the frozen 1B encoder.
    endpoint_url: the S3 endpoint for s3:// weights (janus_job.io).
    lean_activations (default) keeps less for backward in the LLM's MLPs and norms (janus_job.models.janusvln.lean).
    """
    dtype = dtype or torch.bfloat16
    vggt_dtype = vggt_dtype or torch.float32
    if isinstance(vggt, (str, os.PathLike)):
        aggregator = load_aggregator(
            str(vggt), config=vggt_config, device=device, dtype=vggt_dtype, endpoint_url=endpoint_url
        )
    elif vggt is not None:
        with _default_dtype(vggt_dtype), torch.device(device):
            aggregator = FrameCausalAggregator(vggt)
    else:
        aggregator = None
    if aggregator is not None:
        produced = 2 * aggregator.config.embed_dim
        if spatial_channels is not None and spatial_channels != produced:
            raise JobError(
                f"the VGGT aggregator produces {produced}-channel spatial maps but "
                f"{spatial_channels} were requested (cached features of another VGGT?)"
            )
        spatial_channels = produced
    if isinstance(qwen, (str, os.PathLike)):
        local = local_copy(str(qwen), cache_dir, endpoint_url)
        config = AutoConfig.from_pretrained(local)
        channels = spatial_channels or getattr(config, "spatial_channels", SPATIAL_CHANNELS)
        config = janus_config(config, lam=lam, spatial_channels=channels)
        JanusVLNForConditionalGeneration.register_checkpoint_layout()
        model = JanusVLNForConditionalGeneration.from_pretrained(
            local, config=config, dtype=dtype, attn_implementation=attn_implementation).to(device)
        if _checkpoint_holds(local, "merger."):  # a JanusVLN checkpoint: continue with its trained merger
            model.merger_source = "checkpoint"
        else:  # a base Qwen2.5-VL checkpoint: JanusVLN's fresh merger
            model.merger.reset_parameters(config.text_config.initializer_range)
            model.merger_source = "fresh"
    else:
        model = model_from_config(qwen, None, dtype, device, attn_implementation, lam=lam,
                                  spatial_channels=spatial_channels)
        model.merger_source = "fresh"
    if aggregator is not None:
        model.attach_aggregator(aggregator, mode=spatial_mode, register=register_vggt)
    return _finish(model, gradient_checkpointing, lean_activations)


def _checkpoint_holds(directory: str, prefix: str) -> bool:
    """Whether the safetensors checkpoint in `directory` has a tensor whose name starts with `prefix`
    (read from the shard index or the single file's header; no tensor is loaded)."""
    import json

    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = json.load(f).get("weight_map", {})
    else:
        single = os.path.join(directory, "model.safetensors")
        if not os.path.exists(single):
            return False
        with safe_open(single, framework="pt") as f:
            names = list(f.keys())
    return any(name.startswith(prefix) for name in names)


# ---- optimisation ---------------------------------------------------------------------------

"""The named architectures: `qwen2.5-vl-7b` and `vggt-1b` (what JanusVLN trains), `tiny` (a few-layer
variant of each, for the demo, tests and CPU benches: the same code paths at CPU speed).

A flavor is only an architecture (a transformers config or a VGGTAggregatorConfig); weights always
come from checkpoints on disk, which describe their own architecture (janus_job.models.vggt).
"""

from __future__ import annotations

from typing import Any

from janus_job.errors import JobError
from janus_job.models.vggt import VGGTAggregatorConfig

QWEN_FLAVORS = ("qwen2.5-vl-7b", "tiny")
VGGT_FLAVORS = ("vggt-1b", "tiny")
# The tokens a Qwen2.5-VL config names by id; a tiny config takes them from its tokenizer.
QWEN_TOKEN_IDS = ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                  "<|vision_end|>")

# Public config.json of Qwen/Qwen2.5-VL-7B-Instruct, written out so benches need no download.
QWEN25_VL_7B_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    hidden_act="silu",
    max_position_embeddings=128000,
    max_window_layers=28,
    rms_norm_eps=1e-6,
    use_sliding_window=False,
    sliding_window=32768,
    attention_dropout=0.0,
    initializer_range=0.02,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    bos_token_id=151643,
    eos_token_id=151645,
)
QWEN25_VL_7B_VISION = dict(
    depth=32,
    hidden_act="silu",
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
QWEN25_VL_7B_TOKENS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)


def qwen25_vl_7b_config(text_layers: int | None = None) -> Any:
    """Qwen2.5-VL-7B-Instruct's architecture as a transformers config (no weights, no download);
    `text_layers` keeps every width but stacks that many decoder layers (benches that must fit one GPU)."""
    from transformers import Qwen2_5_VLConfig

    text = dict(QWEN25_VL_7B_TEXT)
    if text_layers is not None:
        text.update(num_hidden_layers=text_layers, max_window_layers=text_layers)
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(QWEN25_VL_7B_VISION),
        tie_word_embeddings=False,
        **QWEN25_VL_7B_TOKENS,
    )


def tiny_qwen_config(token_ids: dict[str, int], vocab_size: int, text_hidden: int = 64, text_layers: int = 2):
    """A few-layer Qwen2.5-VL config with the given special-token ids (`QWEN_TOKEN_IDS`).

    The vision window (112 px = 4x4 merge units at patch 14) is smaller than test frames, so the
    window permutation is really exercised.
    """
    from transformers import Qwen2_5_VLConfig

    head_dim = 16
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=text_hidden,
            intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=text_hidden // head_dim,
            num_key_value_heads=max(1, text_hidden // head_dim // 2),
            max_position_embeddings=8192,
            max_window_layers=text_layers,
            rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            bos_token_id=token_ids["<|endoftext|>"],
            eos_token_id=token_ids["<|im_end|>"],
            pad_token_id=token_ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=text_hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        ),
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def vggt_config(flavor: str) -> VGGTAggregatorConfig:
    """The VGGT aggregator architecture of a flavor."""
    if flavor == "vggt-1b":
        return VGGTAggregatorConfig()
    if flavor == "tiny":
        return VGGTAggregatorConfig.tiny()
    raise JobError(f"unknown VGGT flavor {flavor!r}: use one of {', '.join(VGGT_FLAVORS)}")


def qwen_config(flavor: str, token_ids: dict[str, int] | None = None, vocab_size: int | None = None) -> Any:
    """The Qwen2.5-VL architecture of a flavor (`tiny` needs its tokenizer's ids and size)."""
    if flavor == "qwen2.5-vl-7b":
        return qwen25_vl_7b_config()
    if flavor == "tiny":
        if token_ids is None or vocab_size is None:
            raise JobError("the tiny Qwen flavor needs its tokenizer's token ids and vocabulary size")
        return tiny_qwen_config(token_ids, vocab_size)
    raise JobError(f"unknown Qwen flavor {flavor!r}: use one of {', '.join(QWEN_FLAVORS)}")

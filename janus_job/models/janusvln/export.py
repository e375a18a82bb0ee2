"""Exporting a trained model as a checkpoint directory JanusVLN's own code loads (docs/model.md)."""

from __future__ import annotations

import os

from janus_job.errors import JobError

# transformers 5 nests the LLM and vision tower under `model.`; JanusVLN (transformers 4.50) has
# `model.` = the language model and `visual.` at top level.
_EXPORT_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def janusvln_key(name: str) -> str:
    """Our parameter name -> the name in a JanusVLN checkpoint."""
    for ours, theirs in _EXPORT_RENAMES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def export_janusvln_checkpoint(model, out_dir: str, tokenizer=None, image_processor=None,
                               state_dict=None, aggregator=None, copy_from: str | None = None,
                               max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """Writes a directory JanusVLN's `Qwen2_5_VLForConditionalGenerationForJanusVLN.from_pretrained`
    and its evaluation can load: config.json (flat, 4.50-style, with lam/reference_frame),
    sharded model-*.safetensors + index, tokenizer and preprocessor files. Atomic: written to a
    temporary directory, then renamed. Returns the tensor keys written.

    state_dict: the full (gathered) state dict when the model is sharded (ZeRO-3); default
    `model.state_dict()`. The VGGT aggregator comes from the model (registered or detached) or
    `aggregator`; JanusVLN's loader has no other source for it, so it is required.
    copy_from: a local Qwen2.5-VL directory whose tokenizer/processor/generation files are copied
    (what JanusVLN's evaluation loads with AutoTokenizer/AutoProcessor).
    """
    import json
    import shutil

    from safetensors.torch import save_file

    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {}
    for name, tensor in (state_dict if state_dict is not None else model.state_dict()).items():
        state[janusvln_key(name)] = tensor.detach().to("cpu").contiguous()
    if not any(key.startswith("vggt.aggregator.") for key in state):
        aggregator = aggregator if aggregator is not None else model.aggregator
        if aggregator is None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise JobError("export needs the VGGT aggregator weights (JanusVLN's checkpoint carries "
                           "them): build the model with its vggt checkpoint or pass aggregator=")
        for name, tensor in aggregator.state_dict().items():
            state["vggt.aggregator." + name] = tensor.detach().to("cpu").contiguous()
    if model.config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]

    shards: list[dict] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # shared storage (tied weights) cannot be saved twice by safetensors
        save_file({k: v.clone() for k, v in shard.items()}, os.path.join(tmp, fname),
                  metadata={"format": "pt"})
        for key, value in shard.items():
            weight_map[key] = fname
            total += value.numel() * value.element_size()
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(janusvln_config_dict(model.config, dtype=next(model.parameters()).dtype), f, indent=2)
    if copy_from is not None:
        for name in sorted(os.listdir(copy_from)):
            source = os.path.join(copy_from, name)
            weights = name.endswith((".safetensors", ".bin", ".pt")) or name.endswith(".index.json")
            if os.path.isfile(source) and not weights and name != "config.json":
                shutil.copyfile(source, os.path.join(tmp, name))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if image_processor is not None:
        image_processor.save_pretrained(tmp)
    old = out_dir + f".old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return sorted(state)


def janusvln_config_dict(config, dtype=None) -> dict:
    """Flat Qwen2.5-VL config (text keys at top level, as transformers 4.50 saves it) + JanusVLN keys."""
    noise = {"architectures", "model_type", "transformers_version", "dtype", "id2label", "label2id",
             "problem_type", "_name_or_path", "layer_types", "chunk_size_feed_forward",
             "is_encoder_decoder", "output_attentions", "output_hidden_states", "return_dict"}
    text = config.text_config.to_dict()
    vision = {k: v for k, v in config.vision_config.to_dict().items()
              if k not in noise and k != "rope_parameters"}
    vision["model_type"] = "qwen2_5_vl"
    flat = {k: v for k, v in text.items() if k not in noise}
    rope = dict(flat.pop("rope_parameters", {}) or {})
    flat["rope_theta"] = rope.get("rope_theta", 1000000.0)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope.get("mrope_section", [16, 24, 24])}
    vision["in_chans"] = vision.get("in_channels", 3)
    vision["spatial_patch_size"] = vision.get("patch_size", 14)
    flat.update(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        model_type="qwen2_5_vl",
        vision_config=vision,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        vision_token_id=getattr(config, "vision_token_id", 151654),
        tie_word_embeddings=bool(config.tie_word_embeddings),
        lam=float(config.lam),
        reference_frame=getattr(config, "reference_frame", "first"),
        vggt_merger_hidden_dim=int(config.vggt_merger_hidden_dim),
        torch_dtype=str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16",
        transformers_version="4.50.0",
    )
    return flat

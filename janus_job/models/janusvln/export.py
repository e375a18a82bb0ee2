"""Exporting a trained model as a checkpoint directory JanusVLN's own code loads (docs/model.md)."""

from __future__ import annotations

import math
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
        # janus-train's key (JanusVLN hard-codes 2048, VGGT-1B's): lets build_model reload other widths
        spatial_channels=int(getattr(config, "spatial_channels", 2048)),
        torch_dtype=str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16",
        transformers_version="4.50.0",
    )
    return flat


# ---------------------------------------------------------------- export from a DeepSpeed checkpoint

EXPORT_DIR = "export"
# the base Qwen directory's non-weight files JanusVLN's evaluation reads (AutoTokenizer, AutoProcessor,
# generate): copied byte for byte, never re-saved through this transformers version
BASE_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "preprocessor_config.json",
              "chat_template.json", "chat_template.jinja", "generation_config.json")
FILE_MODE = 0o644  # safetensors creates 0600; a reader pod of another uid must read the export
MAX_SHARD_BYTES = 5 * 1024**3


class DeepSpeedWeights:
    """The trained (fp32 master) weights of a DeepSpeed checkpoint directory of any ZeRO stage and
    world size, one parameter at a time: the rank files are memory-mapped, a parameter is put
    together from its slices in each rank's flat partition when it is asked for, so the host holds
    at most one parameter beyond the page cache.

    Layout (DeepSpeed 0.19): `*model_states.pt` of rank 0 names the trainable parameters in
    optimizer-group order (`param_shapes`, one dict per group); every rank's `*optim_states.pt`
    holds its flat fp32 partition of each group. ZeRO-1/2: the group's flat vector (parameters
    back to back, optional per-parameter alignment padding) is cut into equal consecutive rank
    pieces. ZeRO-3: each parameter is cut into world-size equal pieces (zero-padded at the end),
    and a rank's flat vector is its pieces back to back over all groups.
    """

    def __init__(self, directory: str) -> None:
        import glob

        import torch

        self.directory = directory
        model_files = sorted(glob.glob(os.path.join(directory, "*model_states.pt")))
        optim_files = sorted(glob.glob(os.path.join(directory, "*optim_states.pt")), key=_rank_in_name)
        if not model_files or not optim_files:
            raise JobError(f"{directory} is not a DeepSpeed checkpoint (no *model_states.pt / *optim_states.pt)")
        first = next((f for f in model_files if _rank_in_name(f) in (0, None)), model_files[0])
        states = torch.load(first, map_location="cpu", mmap=True, weights_only=False)
        self.groups: list[dict] = [dict(g) for g in states["param_shapes"]]
        self.shared = dict(states.get("shared_params") or {})
        self._optim = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
                       for f in optim_files]
        head = self._optim[0]
        self.world_size = len(self._optim)
        count = head.get("partition_count", self.world_size)
        count = max(count) if isinstance(count, list) else int(count)
        if count != self.world_size:
            raise JobError(f"{directory} holds {self.world_size} optimizer files but was saved by {count} ranks; "
                           "the checkpoint is incomplete")
        self.zero3 = "fp32_flat_groups" in head
        self._locations: dict[str, tuple] = {}
        if self.zero3:
            flats = [torch.cat([t.reshape(-1) for t in o["fp32_flat_groups"]]) if len(o["fp32_flat_groups"]) > 1
                     else o["fp32_flat_groups"][0].reshape(-1) for o in self._optim]
            self._flats = flats
            offset = 0
            for shapes in self.groups:
                for name, shape in shapes.items():
                    numel = math.prod(shape)
                    piece = -(-numel // self.world_size)
                    self._locations[name] = (offset, piece, numel, tuple(shape))
                    offset += piece
            if offset != flats[0].numel():
                raise JobError(f"{directory}: ZeRO-3 partitions hold {flats[0].numel()} elements per rank, "
                               f"the parameter shapes need {offset}; the checkpoint does not match its own layout")
        else:
            paddings = head.get("param_alignment_paddings")
            key = "single_partition_of_fp32_groups"
            self._parts = [[t.reshape(-1) for t in o[key]] for o in self._optim]
            for g, shapes in enumerate(self.groups):
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    numel = math.prod(shape)
                    self._locations[name] = (g, offset, numel, tuple(shape))
                    offset += numel + (paddings[g][i] if paddings is not None else 0)
                if offset > self._parts[0][g].numel() * self.world_size:
                    raise JobError(f"{directory}: optimizer group {g} is smaller than its parameters")

    def names(self) -> list[str]:
        return list(self._locations) + [n for n in self.shared if n not in self._locations]

    def shape(self, name: str) -> tuple:
        return self._locations[self.shared.get(name, name)][-1]

    def get(self, name: str):
        """The full fp32 parameter `name` (a new tensor)."""
        import torch

        name = name if name in self._locations else self.shared[name]
        if self.zero3:
            offset, piece, numel, shape = self._locations[name]
            return torch.cat([flat[offset:offset + piece] for flat in self._flats])[:numel].view(shape)
        group, offset, numel, shape = self._locations[name]
        size = self._parts[0][group].numel()
        pieces, start, end = [], offset, offset + numel
        while start < end:
            rank, within = divmod(start, size)
            take = min(end - start, size - within)
            pieces.append(self._parts[rank][group][within:within + take])
            start += take
        return torch.cat(pieces).view(shape)


def _rank_in_name(path: str) -> int | None:
    import re

    found = re.search(r"zero_pp_rank_(\d+)_", os.path.basename(path))
    return int(found.group(1)) if found else None


class ShardWriter:
    """Writes tensors into consecutive safetensors files of at most `max_shard_bytes` (mode 0644)
    and the index; holds one shard in memory at a time."""

    def __init__(self, directory: str, max_shard_bytes: int = MAX_SHARD_BYTES, progress=None) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.progress = progress
        self.pending: dict = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, key: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.directory, f"part-{len(self.files):05d}.safetensors")
        save_file(self.pending, path, metadata={"format": "pt"})
        self.files.append(sorted(self.pending))
        if self.progress:
            self.progress(f"export wrote shard {len(self.files)} ({self.pending_bytes / 1024**3:.2f} GiB, "
                          f"{self.total / 1024**3:.2f} GiB so far)")
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Names the shards model-0000i-of-0000n.safetensors, writes the index; returns the keys."""
        import json

        if self.pending:
            self._flush()
        weight_map = {}
        n = len(self.files)
        for i, keys in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path = os.path.join(self.directory, name)
            os.replace(os.path.join(self.directory, f"part-{i:05d}.safetensors"), path)
            os.chmod(path, FILE_MODE)
            weight_map.update(dict.fromkeys(keys, name))
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)
        return sorted(weight_map)


class _SafetensorsDir:
    """Tensors of a local safetensors checkpoint directory (single file or sharded), by name."""

    def __init__(self, directory: str) -> None:
        import json

        from safetensors import safe_open

        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"] if os.path.exists(os.path.join(directory, "model.safetensors")) else []
        self._handles = [safe_open(os.path.join(directory, name), framework="pt", device="cpu") for name in files]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str):
        return self._where[key].get_tensor(key)


def write_export(checkpoint_dir: str, qwen_dir: str, vggt_path: str, out_dir: str, dtype: str = "bfloat16",
                 lam: float | None = None, max_shard_bytes: int = MAX_SHARD_BYTES, progress=print) -> list[str]:
    """Writes a JanusVLN checkpoint into the empty local directory `out_dir` from a DeepSpeed
    checkpoint directory (trained weights), the base Qwen2.5-VL directory (frozen weights, config,
    tokenizer/processor files) and a VGGT checkpoint (aggregator). config.json comes last.
    Returns the tensor keys written."""
    import json
    import shutil

    import torch
    from transformers import AutoConfig

    from janus_job.models.janusvln.model import DEFAULT_LAM, JanusVLNForConditionalGeneration, janus_config
    from janus_job.models.vggt import CHECKPOINT_PREFIX

    torch_dtype = getattr(torch, dtype)
    trained = DeepSpeedWeights(checkpoint_dir)
    merger = "merger.ln_q.weight"
    if merger not in trained.names():
        raise JobError(f"{checkpoint_dir} holds no trained spatial merger ({merger}); is it a janus-train checkpoint?")
    channels = trained.shape(merger)[0]
    hidden = trained.shape("merger.mlp.0.weight")[0]
    config = janus_config(AutoConfig.from_pretrained(qwen_dir), lam=DEFAULT_LAM if lam is None else lam,
                          spatial_channels=channels, merger_hidden=hidden)
    with torch.device("meta"):
        skeleton = JanusVLNForConditionalGeneration(config)
    wanted = {janusvln_key(name): (name, tuple(t.shape)) for name, t in skeleton.state_dict().items()
              if not name.startswith("vggt.")}
    del skeleton
    base = _SafetensorsDir(qwen_dir)
    base_keys = {janusvln_key(k): k for k in base.keys()}
    writer = ShardWriter(out_dir, max_shard_bytes, progress)
    from_trained = from_base = 0
    for key in sorted(wanted):
        ours, shape = wanted[key]
        if ours in trained.names():
            tensor, from_trained = trained.get(ours), from_trained + 1
        elif key in base_keys:
            tensor, from_base = base.get(base_keys[key]), from_base + 1
        elif key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # added below from the embedding
        else:
            raise JobError(f"export: {ours} is neither in checkpoint {checkpoint_dir} nor in base model {qwen_dir}")
        if tuple(tensor.shape) != shape:
            raise JobError(f"export: {ours} has shape {tuple(tensor.shape)}, the model needs {shape}; "
                           "model.qwen is not the model this checkpoint was trained from")
        writer.add(key, tensor.to(torch_dtype))
    if config.tie_word_embeddings and "lm_head.weight" not in writer.pending and "lm_head.weight" in wanted:
        embed = trained.get(wanted["model.embed_tokens.weight"][0]) if wanted["model.embed_tokens.weight"][0] \
            in trained.names() else base.get(base_keys["model.embed_tokens.weight"])
        writer.add("lm_head.weight", embed.to(torch_dtype))
    vggt_count = 0
    for name, tensor in _vggt_tensors(vggt_path, CHECKPOINT_PREFIX):
        writer.add("vggt.aggregator." + name, tensor.to(torch_dtype))
        vggt_count += 1
    if not vggt_count:
        raise JobError(f"model.vggt {vggt_path} has no aggregator.* tensors; point it at VGGT-1B's model.safetensors")
    keys = writer.close()
    progress(f"export weights: {from_trained} trained tensors from the checkpoint, {from_base} frozen from model.qwen, "
             f"{vggt_count} VGGT aggregator tensors")
    copied = []
    for name in BASE_FILES:
        source = os.path.join(qwen_dir, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(out_dir, name))
            os.chmod(os.path.join(out_dir, name), FILE_MODE)
            copied.append(name)
    if "tokenizer_config.json" not in copied:
        raise JobError(f"model.qwen {qwen_dir} has no tokenizer_config.json; JanusVLN's evaluation needs the base "
                       "model's tokenizer files")
    progress(f"export copied from model.qwen: {', '.join(copied)}")
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path + ".tmp", "w") as f:
        json.dump(janusvln_config_dict(config, dtype=torch_dtype), f, indent=2)
    os.replace(config_path + ".tmp", config_path)
    os.chmod(config_path, FILE_MODE)
    return keys


def _vggt_tensors(path: str, prefix: str):
    """(name without `prefix`, tensor) of a VGGT checkpoint's aggregator, one at a time."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            for key in sorted(f.keys()):
                if key.startswith(prefix):
                    yield key[len(prefix):], f.get_tensor(key)
        return
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    for key in sorted(state):
        if key.startswith(prefix):
            yield key[len(prefix):], state[key]

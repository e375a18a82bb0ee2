"""JanusVLN on transformers' Qwen2.5-VL: spatial merger, lam blend, feature sources, restricted loss.

`JanusVLNForConditionalGeneration` subclasses transformers' `Qwen2_5_VLForConditionalGeneration`
and adds only what JanusVLN adds: a `merger` (the spatial merger, same parameter names as
JanusVLN's VGGTMerger), an optional frozen VGGT aggregator under `vggt.aggregator`, and a forward
that blends `lam * merger(spatial map of the sample's last frame)` into every image embedding of
the same sample. Its forward takes the batch contract of janus_job.data.dataset directly
(`model(**batch)`), and computes the LM head and cross-entropy only where a label exists.

Imports torch and transformers: import this module inside CLI command functions, not at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm
from transformers.vision_utils import get_vision_window_index

from janus_job.errors import JobError
from janus_job.models.vggt import spatial_features as vggt_spatial_features

IGNORE_INDEX = -100
DEFAULT_LAM = 0.2
SPATIAL_CHANNELS = 2048  # VGGT-1B: frame and global halves of the aggregator output, concatenated
SPATIAL_MERGER_HIDDEN = 4096
QWEN_VISION_CHANNELS = 1280

def janus_config(qwen_config, lam: float = DEFAULT_LAM, spatial_channels: int = SPATIAL_CHANNELS,
                 merger_hidden: int = SPATIAL_MERGER_HIDDEN):
    """Adds JanusVLN's extra config keys (`lam`, `vggt_merger_hidden_dim`, `reference_frame`)."""
    qwen_config.lam = float(lam)
    qwen_config.vggt_merger_hidden_dim = int(merger_hidden)
    qwen_config.spatial_channels = int(spatial_channels)
    qwen_config.reference_frame = getattr(qwen_config, "reference_frame", "first")
    return qwen_config


class SpatialMerger(nn.Module):
    """RMSNorm per token, 2x2 neighbours concatenated, MLP to the LLM width.

    Parameter names (`ln_q.weight`, `mlp.0.*`, `mlp.2.*`) and merge order are JanusVLN's.
    """

    def __init__(self, out_dim: int, hidden_dim: int = SPATIAL_MERGER_HIDDEN,
                 context_dim: int = SPATIAL_CHANNELS, merge_size: int = 2):
        super().__init__()
        self.context_dim = context_dim
        self.merge_size = merge_size
        self.input_dim = context_dim * merge_size * merge_size
        self.ln_q = Qwen2_5_VLRMSNorm(context_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.input_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def reset_parameters(self, std: float = 0.02) -> None:
        """The init JanusVLN's merger gets (transformers' Qwen2.5-VL `_init_weights`)."""
        with torch.no_grad():
            self.ln_q.weight.fill_(1.0)
            for layer in (self.mlp[0], self.mlp[2]):
                layer.weight.normal_(0.0, std)
                layer.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(n, H, W, C) with H, W even -> (n, H/2 * W/2, out_dim)."""
        n, h, w, c = features.shape
        m = self.merge_size
        if c != self.context_dim:
            raise JobError(
                f"spatial features have {c} channels but the spatial merger takes "
                f"{self.context_dim}: the features were computed by another VGGT (re-run precompute "
                "with this model's VGGT)"
            )
        if h % m or w % m:
            raise JobError(
                f"spatial features have a {h}x{w} patch grid; the spatial merger needs it even "
                f"(multiples of {m}): crop the grid when computing them (vggt.spatial_features does)"
            )
        grouped = features.view(n, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5)
        grouped = self.ln_q(grouped.contiguous()).reshape(n, (h // m) * (w // m), self.input_dim)
        return self.mlp(grouped)

class VGGTHolder(nn.Module):
    """Gives the frozen aggregator JanusVLN's key prefix `vggt.aggregator.`."""

    def __init__(self, aggregator: nn.Module):
        super().__init__()
        self.aggregator = aggregator

@dataclass
class JanusVLNOutput(ModelOutput):
    loss: torch.Tensor | None = None
    num_label_tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # restricted: (num_label_tokens, vocab) when requested
    computed_spatial: list | None = None  # per sample (Hp, Wp, C) computed online, else None
    computed_vision: torch.Tensor | None = None  # (sum patches, 1280) when computed online

class JanusVLNForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL + JanusVLN's spatial branch. Trainable: LLM, vision merger, spatial merger."""

    # a JanusVLN checkpoint (an export) carries VGGT's weights; the aggregator is attached after loading
    # (from model.vggt, as JanusVLN's training reloads VGGT), so they are not reported as unexpected
    _keys_to_ignore_on_load_unexpected = [r"^vggt\."]

    @classmethod
    def register_checkpoint_layout(cls) -> None:
        """Lets from_pretrained read Qwen's published (4.x) key layout into this subclass.

        transformers renames `model.*` / `visual.*` only for its own classes; a subclass defined
        outside it counts as custom code unless its class name is registered.
        """
        from transformers.conversion_mapping import (
            USER_REGISTERED_MAPPINGS,
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )

        if cls.__name__ not in USER_REGISTERED_MAPPINGS:
            layout = get_checkpoint_conversion_mapping(Qwen2_5_VLForConditionalGeneration.__name__)
            register_checkpoint_conversion_mapping(cls.__name__, layout, overwrite=True)

    def __init__(self, config):
        super().__init__(config)
        janus_config(
            config,
            lam=getattr(config, "lam", DEFAULT_LAM),
            spatial_channels=getattr(config, "spatial_channels", SPATIAL_CHANNELS),
            merger_hidden=getattr(config, "vggt_merger_hidden_dim", SPATIAL_MERGER_HIDDEN),
        )
        self.merger = SpatialMerger(
            out_dim=config.text_config.hidden_size,
            hidden_dim=config.vggt_merger_hidden_dim,
            context_dim=config.spatial_channels,
            merge_size=config.vision_config.spatial_merge_size,
        )
        self.merger.reset_parameters(config.text_config.initializer_range)
        self.vggt = None
        self._detached_aggregator = None
        self.spatial_mode = "batched"
        self.freeze_encoders()

    @property
    def lam(self) -> float:
        return float(self.config.lam)

    @property
    def aggregator(self):
        """The frozen VGGT aggregator (registered or detached), or None."""
        return self.vggt.aggregator if self.vggt is not None else self._detached_aggregator

    def attach_aggregator(self, aggregator: nn.Module, mode: str = "batched",
                          register: bool = True) -> None:
        """Makes the frozen VGGT aggregator available for `vggt_frames` batches.

        register=True puts it under `vggt.aggregator` (JanusVLN's layout, part of
        parameters()/state_dict()); register=False keeps it outside the module tree so a
        DeepSpeed engine neither partitions nor gathers it (export still writes it).
        """
        aggregator.eval()
        for param in aggregator.parameters():
            param.requires_grad = False
        if register:
            self.vggt, self._detached_aggregator = VGGTHolder(aggregator), None
        else:
            self.vggt = None
            object.__setattr__(self, "_detached_aggregator", aggregator)
        self.spatial_mode = mode

    def freeze_encoders(self) -> None:
        for name, param in self.model.visual.named_parameters():
            param.requires_grad = name.startswith("merger.")
        if self.aggregator is not None:
            self.aggregator.eval()
            for param in self.aggregator.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.aggregator is not None:
            self.aggregator.eval()
        return self

    # ---- image embeddings -------------------------------------------------------------
    def _vision_embeddings(self, image_grid_thw, pixel_values, vision_features, keep_hidden):
        """Merged image embeddings (placeholder order) and, if asked, the online hidden states.

        Online, transformers' own tower runs (frozen blocks record no graph; only the merger
        does): it is the reference the cached path (`vision_tower_features`) must match.
        """
        merger = self.model.visual.merger
        if vision_features is not None:
            return merger(vision_features.to(merger.mlp[0].weight.dtype)), None
        if pixel_values is None:
            raise JobError("batch has neither `vision_features` nor `pixel_values`")
        visual = self.model.visual
        out = visual(pixel_values.to(visual.patch_embed.proj.weight.dtype),
                     grid_thw=image_grid_thw.to(pixel_values.device))
        hidden = None
        if keep_hidden:
            hidden = _natural_order(visual, out.last_hidden_state.detach(), image_grid_thw)
        return out.pooler_output, hidden

    def _spatial_maps(self, batch_size, spatial_features, vggt_frames):
        """Per sample (Hp, Wp, C) map of its last frame, from the cache or the aggregator."""
        maps: list = [None] * batch_size
        computed: list = [None] * batch_size
        if spatial_features is not None:
            for b in range(batch_size):
                maps[b] = spatial_features[b]
        missing = [b for b in range(batch_size) if maps[b] is None]
        if missing:
            if vggt_frames is None:
                raise JobError("batch has samples without `spatial_features` and no `vggt_frames`")
            if self.aggregator is None:
                raise JobError(
                    "spatial features must be computed online but the model has no VGGT "
                    "aggregator: build it with a vggt checkpoint (spec model.vggt) or use a "
                    "feature store"
                )
            device = self.model.visual.patch_embed.proj.weight.device
            groups: dict[tuple, list[int]] = {}
            for b in missing:  # samples with equal frame stacks run as one batch
                groups.setdefault(tuple(vggt_frames[b].shape), []).append(b)
            for members in groups.values():
                frames = torch.stack([vggt_frames[b] for b in members]).to(device)
                with torch.no_grad(), encoder_autocast(self.dtype, device):
                    out = vggt_spatial_features(self.aggregator, frames, self.spatial_mode)
                for b, spatial_map in zip(members, out):
                    maps[b] = computed[b] = spatial_map
        return maps, computed

    def image_embeddings(self, input_ids, image_grid_thw, images_per_sample, pixel_values=None,
                         vision_features=None, spatial_features=None,
                         vggt_frames=None, sample_ids=None, keep_computed: bool = False):
        """(image tokens of the batch, hidden) in placeholder order, JanusVLN blend applied."""
        dtype = self.model.visual.merger.mlp[0].weight.dtype
        image_embeds, computed_vision = self._vision_embeddings(
            image_grid_thw, pixel_values, vision_features, keep_computed)
        batch_size = input_ids.shape[0]
        maps, computed_spatial = self._spatial_maps(batch_size, spatial_features, vggt_frames)
        if len({tuple(m.shape) for m in maps}) == 1:
            stacked = self.merger(torch.stack(maps).to(dtype))
            spatial = list(stacked.unbind(0))
        else:
            spatial = [self.merger(m[None].to(dtype))[0] for m in maps]
        tokens_per_image = (image_grid_thw.prod(-1) // self.model.visual.spatial_merge_unit).tolist()
        owners = [b for b, n in enumerate(images_per_sample.tolist()) for _ in range(n)]
        for i, b in enumerate(owners):
            if tokens_per_image[i] != spatial[b].shape[0]:
                sid = sample_ids[b] if sample_ids else f"#{b}"
                raise JobError(
                    f"sample {sid}: image {i} has {tokens_per_image[i]} visual tokens but its "
                    f"spatial map merges to {spatial[b].shape[0]}; the Qwen image and the VGGT "
                    "frame must share one patch grid (check max_pixels/min_pixels: they must "
                    "not resize the frames)"
                )
        blend = torch.cat([spatial[o] for o in owners]) if owners else image_embeds[:0]
        image_embeds = image_embeds + self.lam * blend
        return image_embeds, computed_spatial, computed_vision

    # ---- forward ------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, image_grid_thw=None,
                images_per_sample=None, pixel_values=None, vision_features=None,
                spatial_features=None, vggt_frames=None, sample_ids=None, position_ids=None,
                image_index=None, label_index=None,
                return_logits: bool = False, return_computed_features: bool = False, **unexpected):
        if unexpected:
            raise TypeError(f"JanusVLN forward got keys outside the batch contract: {sorted(unexpected)}")
        embed = self.model.get_input_embeddings()
        inputs_embeds = embed(input_ids)
        computed_spatial = computed_vision = None
        if image_grid_thw is not None and image_grid_thw.shape[0] > 0:
            if images_per_sample is None:
                images_per_sample = torch.tensor([image_grid_thw.shape[0]])
            image_embeds, computed_spatial, computed_vision = self.image_embeddings(
                input_ids, image_grid_thw, images_per_sample, pixel_values, vision_features,
                spatial_features, vggt_frames, sample_ids, return_computed_features)
            image_embeds = image_embeds.to(inputs_embeds.dtype)
            # the loader's indices (janus_job.data.step_indices) need no device synchronisation here or in
            # backward; without them the image tokens are counted and found on the GPU
            if image_index is not None:
                if image_index.numel() != image_embeds.shape[0]:
                    raise JobError(f"batch {sample_ids}: {image_index.numel()} image placeholder tokens but "
                                   f"{image_embeds.shape[0]} image embeddings (tokenisation and image grid disagree)")
                flat = inputs_embeds.reshape(-1, inputs_embeds.shape[-1])
                inputs_embeds = flat.index_copy(0, image_index, image_embeds).view_as(inputs_embeds)
            else:
                image_mask = input_ids == self.config.image_token_id
                n_slots = int(image_mask.sum())
                if n_slots != image_embeds.shape[0]:
                    raise JobError(
                        f"batch {sample_ids}: {n_slots} image placeholder tokens but "
                        f"{image_embeds.shape[0]} image embeddings (tokenisation and image grid disagree)"
                    )
                inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_embeds)
            if position_ids is None:
                position_ids, _ = self.model.get_rope_index(
                    input_ids, (input_ids == self.config.image_token_id).int(), image_grid_thw=image_grid_thw,
                    attention_mask=attention_mask)
        hidden = self.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            position_ids=position_ids, use_cache=False).last_hidden_state
        loss = n_tokens = logits = None
        if labels is not None:
            loss, n_tokens, logits = restricted_lm_loss(self.lm_head, hidden, labels, return_logits, label_index)
        return JanusVLNOutput(
            loss=loss, num_label_tokens=n_tokens, logits=logits,
            computed_spatial=computed_spatial if return_computed_features else None,
            computed_vision=computed_vision if return_computed_features else None,
        )


def encoder_autocast(dtype, device):
    """bf16/fp16 autocast on GPU for the frozen encoders (JanusVLN runs fp32 VGGT this way)."""
    device = torch.device(device)
    enabled = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def restricted_lm_loss(lm_head, hidden, labels, return_logits: bool = False, label_index=None):
    """Mean next-token cross-entropy, computing logits only where the shifted label is set.

    Equal to full-vocabulary cross-entropy over all positions with ignore_index -100 (JanusVLN's
    loss), without materialising (B, L, vocab) logits. Returns (loss, label count, logits or None).
    label_index: those positions, flat over (batch, length), found by the loader
    (janus_job.data.step_indices); without it they are found on the GPU (a synchronisation).
    """
    if label_index is not None:
        n_tokens = torch.full((), label_index.numel(), dtype=torch.long, device=hidden.device)
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, label_index)
        target = labels.reshape(-1).index_select(0, label_index + 1)
    else:
        target = labels[:, 1:]
        select = target != IGNORE_INDEX
        n_tokens = select.sum()
        picked = hidden[:, :-1][select]
        target = target[select]
    logits = lm_head(picked).float()
    if picked.shape[0] == 0:
        loss = hidden.sum() * 0.0
    else:
        loss = torch.nn.functional.cross_entropy(logits, target)
    return loss, n_tokens, (logits if return_logits else None)


def vision_tower_features(visual, pixel_values, grid_thw) -> list:
    """Runs the frozen Qwen vision blocks; per image (patches, 1280) in natural (processor) order.

    `visual.merger(cat(result))` equals the image embeddings of transformers' online tower.
    """
    with torch.no_grad():
        dtype = visual.patch_embed.proj.weight.dtype
        hidden = visual(pixel_values.to(dtype), grid_thw=grid_thw).last_hidden_state
        hidden = _natural_order(visual, hidden, grid_thw)
    return list(hidden.split(grid_thw.prod(-1).tolist()))


def _natural_order(visual, hidden, grid_thw):
    """Undo the tower's window permutation of merge units (the order its blocks run in)."""
    window_index, _ = get_vision_window_index(
        grid_thw, spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size, patch_size=visual.patch_size)
    unit = visual.spatial_merge_unit
    channels = hidden.shape[-1]
    restore = torch.argsort(window_index.to(hidden.device))
    return hidden.reshape(-1, unit, channels)[restore].reshape(-1, channels)

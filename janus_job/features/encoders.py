"""The two frozen encoders whose outputs the store caches, and the fingerprints that name them.

An `Encoders` holds the spatial function (the frame-causal VGGT aggregator) and the vision
function (Qwen2.5-VL's vision blocks before the merger) on one device, with a `Fingerprint` for
each: function version, weights digest, architecture, geometry, compute mode and stored dtype
(docs/features.md). A store opened with other fingerprints is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from janus_job.errors import JobError
from janus_job.features.store import FeatureStore, Fingerprint, state_dict_digest

if TYPE_CHECKING:
    import torch

# Bump when the cached function's code changes in a way that changes its output.
SPATIAL_FUNCTION = (
    "janus-spatial-1: frame-causal VGGT aggregator, layer depth-2, frame+global halves, last frame, even patch grid"
)
VISION_FUNCTION = (
    "janus-vision-1: Qwen2.5-VL vision blocks before the merger, natural merge-unit order, even patch grid"
)
STORED_DTYPE = "bfloat16"


@dataclass
class Encoders:
    """The two frozen functions on one device, with the fingerprints that name them."""

    device: str
    target_width: int
    patch: int
    merge: int
    spatial: Callable[[torch.Tensor], torch.Tensor]  # (B, S, 3, H, W) -> (B, h, w, C)
    spatial_fingerprint: Fingerprint
    vision: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None  # frames -> (n, C) each
    vision_fingerprint: Fingerprint | None = None

    def fingerprints(self) -> list[Fingerprint]:
        return [fp for fp in (self.spatial_fingerprint, self.vision_fingerprint) if fp is not None]


def _compute_mode(device: str) -> str:
    return "bf16-autocast" if str(device).startswith("cuda") else "float32"


def spatial_fingerprint(weights_sha256: str, config: Any, target_width: int, compute: str) -> Fingerprint:
    return Fingerprint(
        "spatial",
        {
            "function": SPATIAL_FUNCTION,
            "weights_sha256": weights_sha256,
            "architecture": config.to_dict(),
            "target_width": target_width,
            "patch": config.patch_size,
            "layer": config.feature_layer,
            "compute": compute,
            "stored_dtype": STORED_DTYPE,
        },
    )


def vision_fingerprint(
    weights_sha256: str, vision_config: Any, processor: Any, target_width: int, compute: str
) -> Fingerprint:
    arch = vision_config.to_dict() if hasattr(vision_config, "to_dict") else dict(vision_config)
    arch = {k: v for k, v in arch.items() if not k.startswith(("_", "transformers_version", "torch_dtype", "dtype"))}
    return Fingerprint(
        "vision",
        {
            "function": VISION_FUNCTION,
            "weights_sha256": weights_sha256,
            "architecture": json.loads(json.dumps(arch, default=str)),
            "target_width": target_width,
            "image_mean": [float(x) for x in processor.image_mean],
            "image_std": [float(x) for x in processor.image_std],
            "min_pixels": int(getattr(processor, "min_pixels", 0) or 0),
            "max_pixels": int(getattr(processor, "max_pixels", 0) or 0),
            "compute": compute,
            "stored_dtype": STORED_DTYPE,
        },
    )


def frozen_visual_digest(state_dict: Any) -> str:
    """The vision tower's weights without the merger (trainable in JanusVLN, so not cached)."""
    return state_dict_digest({k: v for k, v in state_dict.items() if not k.startswith("merger.")})


def _spatial_fn(aggregator: Any, device: str) -> Callable:
    import torch

    from janus_job.models.vggt import spatial_features

    def run(frames: torch.Tensor) -> torch.Tensor:
        frames = frames.to(device, non_blocking=True)
        if str(device).startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return spatial_features(aggregator, frames, mode="batched")
        return spatial_features(aggregator, frames, mode="batched")

    return run


def _vision_fn(visual: Any, processor: Any, device: str, patch: int, merge: int) -> Callable:
    import torch

    from janus_job.data import frames as frame_ops
    from janus_job.models.janusvln.model import vision_tower_features

    def run(images: list[torch.Tensor]) -> list[torch.Tensor]:
        cropped = [frame_ops.crop_to_even_patch_grid(img, patch, merge) for img in images]
        out = processor(images=cropped, return_tensors="pt", do_rescale=False)
        grid = out["image_grid_thw"].to(torch.long)
        for img, (_, gh, gw) in zip(cropped, grid.tolist()):
            if (gh * patch, gw * patch) != tuple(img.shape[-2:]):
                raise JobError(
                    f"the Qwen image processor resized a {img.shape[-1]}x{img.shape[-2]} frame "
                    f"(data.min_pixels/max_pixels); cached vision features need the unresized frame"
                )
        return vision_tower_features(visual, out["pixel_values"].to(device), grid.to(device))

    return run


def read_qwen_visual(qwen: str, endpoint_url: str | None = None) -> tuple[dict, Any]:
    """The ``visual.*`` tensors of a Qwen2.5-VL checkpoint as stored (names without the prefix),
    and its vision config."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from janus_job.io import local_copy

    local = local_copy(qwen, endpoint_url=endpoint_url)
    config = AutoConfig.from_pretrained(local)
    files = sorted(f for f in os.listdir(local) if f.endswith(".safetensors"))
    if not files:
        raise JobError(f"model.qwen {qwen}: no .safetensors files in {local}")
    state = {}
    for name in files:
        with safe_open(os.path.join(local, name), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                for prefix in ("visual.", "model.visual."):
                    if key.startswith(prefix):
                        state[key[len(prefix) :]] = handle.get_tensor(key)
    return state, config.vision_config


def load_qwen_visual(qwen: str, device: str, dtype: Any, endpoint_url: str | None = None) -> tuple[Any, Any, str]:
    """Only the vision tower of a Qwen2.5-VL checkpoint, its config and the digest of its frozen
    weights as stored in the checkpoint (the same whatever dtype the tower is run in)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    state, vision_config = read_qwen_visual(qwen, endpoint_url)
    # Built for real, not on "meta": non-persistent buffers (rotary tables) are not in the checkpoint.
    visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config)
    try:
        visual.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise JobError(f"model.qwen {qwen}: its visual.* tensors do not fit the vision config: {err}") from err
    return visual.to(device=device, dtype=dtype).eval(), vision_config, frozen_visual_digest(state)


def load_encoders(spec: Any, device: str, *, vision: bool | None = None) -> Encoders:
    """The encoders of a job spec: the VGGT aggregator of model.vggt (the architecture its checkpoint
    describes, VGGT-1B when it describes none), the vision tower of model.qwen, at data.frame_width."""
    import torch

    from janus_job.data import frames as frame_ops
    from janus_job.models.vggt import load_aggregator

    width = int(spec.data.frame_width)
    aggregator = load_aggregator(
        spec.model.vggt, None, device, torch.float32, endpoint_url=spec.features.endpoint_url
    ).eval()
    config = aggregator.config
    compute = _compute_mode(device)
    encoders = Encoders(
        device=device,
        target_width=width,
        patch=frame_ops.PATCH_SIZE,
        merge=frame_ops.MERGE_SIZE,
        spatial=_spatial_fn(aggregator, device),
        spatial_fingerprint=spatial_fingerprint(state_dict_digest(aggregator.state_dict()), config, width, compute),
    )
    if spec.features.cache_vision if vision is None else vision:
        from janus_job.data.dataset import load_processor
        from janus_job.io import local_copy

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        visual, vision_config, digest = load_qwen_visual(spec.model.qwen, device, dtype, spec.features.endpoint_url)
        local = local_copy(spec.model.qwen, endpoint_url=spec.features.endpoint_url)
        processor = load_processor(local, spec.data.min_pixels, spec.data.max_pixels).image_processor
        encoders.vision = _vision_fn(visual, processor, device, frame_ops.PATCH_SIZE, frame_ops.MERGE_SIZE)
        encoders.vision_fingerprint = vision_fingerprint(digest, vision_config, processor, width, compute)
    return encoders


def expected_fingerprints(
    spec: Any, *, compute: str = "bf16-autocast", hash_weights: bool = True, stored: FeatureStore | None = None
) -> list[Fingerprint]:
    """The fingerprints a consumer (trainer, verify) opens the store with.

    ``hash_weights`` loads the spec's weights on CPU and hashes them (seconds to a minute for
    VGGT-1B + the vision tower). Without it, the weight digests are taken from ``stored``'s
    manifests and every other field (function version, architecture, geometry, dtype) is still
    checked (the VGGT architecture as its checkpoint describes it, read without its tensors); use
    that where the weights are not at hand, knowing a weight swap goes unnoticed.
    """
    vision = bool(spec.features.cache_vision)
    width = int(spec.data.frame_width)
    if hash_weights:
        found = load_encoders(spec, "cpu", vision=vision).fingerprints()
    else:
        from janus_job.models.vggt import VGGTAggregatorConfig, describe_checkpoint

        if stored is None:
            raise JobError("expected_fingerprints without hash_weights needs the store to read weight digests from")

        def digest(kind: str) -> str:
            record = stored.manifest(kind)
            if record is None:
                raise JobError(f"feature store {stored.url} has no {kind} manifest: run `janus-job precompute` first")
            return str(record["fields"].get("weights_sha256"))

        architecture = describe_checkpoint(spec.model.vggt, spec.features.endpoint_url) or VGGTAggregatorConfig()
        found = [spatial_fingerprint(digest("spatial"), architecture, width, compute)]
        if vision:
            from transformers import AutoConfig

            from janus_job.data.dataset import load_processor
            from janus_job.io import local_copy

            local = local_copy(spec.model.qwen, endpoint_url=spec.features.endpoint_url)
            processor = load_processor(local, spec.data.min_pixels, spec.data.max_pixels).image_processor
            found.append(
                vision_fingerprint(
                    digest("vision"), AutoConfig.from_pretrained(local).vision_config, processor, width, compute
                )
            )
    return [Fingerprint(fp.kind, {**fp.fields, "compute": compute}) for fp in found]

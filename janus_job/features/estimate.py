"""`janus-job features estimate`: store size and GPU hours of a precompute, before running it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from janus_job.data.annotations import AnnotationSet, load_spec_annotations
from janus_job.errors import JobError
from janus_job.io import read_bytes

# Per-sample GPU costs on one H100 used by `features estimate` (measured at the
# official geometry: one batched 9-frame VGGT pass 0.323 s, the vision tower 0.312 s per
# 9-image sample). Spatial cost is scaled linearly with the frame count.
H100_SPATIAL_S_PER_9_FRAME_SAMPLE = 0.323
H100_VISION_S_PER_FRAME = 0.312 / 9



@dataclass
class Estimate:
    samples: int
    unique_frames: int
    samples_by_frames: dict[int, int] = field(default_factory=dict)
    spatial_bytes: int = 0
    vision_bytes: int = 0
    spatial_gpu_hours: float = 0.0
    vision_gpu_hours: float = 0.0
    wall_hours: float = 0.0
    frame_size: tuple[int, int] = (0, 0)


def estimate(spec: Any, *, spatial_s_per_9_frames: float = H100_SPATIAL_S_PER_9_FRAME_SAMPLE,
             vision_s_per_frame: float = H100_VISION_S_PER_FRAME,
             annotations: AnnotationSet | None = None) -> Estimate:
    """Counts and sizes from the annotations and the first frame's size; costs from the constants."""
    import io

    from PIL import Image

    from janus_job.data import frames as frame_ops

    annotations = annotations or load_spec_annotations(spec)
    first = annotations.samples[0].frame_paths[0]
    try:
        with Image.open(io.BytesIO(read_bytes(first, spec.features.endpoint_url))) as img:
            width, height = img.size
    except (OSError, Image.UnidentifiedImageError) as err:
        raise JobError(f"cannot read the first frame {first} to size the features: {err}") from err
    geometry = frame_ops.frame_geometry(width, height, spec.data.frame_width)
    header = 200
    spatial_each = geometry.spatial_grid[0] * geometry.spatial_grid[1] * 2048 * 2 + header
    vision_each = geometry.qwen_grid[0] * geometry.qwen_grid[1] * 1280 * 2 + header
    by_frames: dict[int, int] = {}
    for sample in annotations.samples:
        by_frames[sample.num_frames] = by_frames.get(sample.num_frames, 0) + 1
    frames = annotations.unique_images()
    result = Estimate(samples=len(annotations), unique_frames=len(frames),
                      samples_by_frames=dict(sorted(by_frames.items())), frame_size=(width, height))
    result.spatial_bytes = spatial_each * len(annotations)
    spatial_s = sum(count * spatial_s_per_9_frames * n / 9 for n, count in by_frames.items())
    result.spatial_gpu_hours = spatial_s / 3600
    if spec.features.cache_vision:
        result.vision_bytes = vision_each * len(frames)
        result.vision_gpu_hours = len(frames) * vision_s_per_frame / 3600
    gpus = spec.precompute.pods * spec.precompute.gpus_per_pod
    result.wall_hours = (result.spatial_gpu_hours + result.vision_gpu_hours) / gpus
    return result

"""Frame decode and the one preprocessing both frozen encoders share (JanusVLN semantics).

JanusVLN feeds every frame through VGGT's ``load_and_preprocess_images`` in crop mode with a
target width of 644: the width becomes 644, the height keeps the aspect ratio and is rounded to a
multiple of 14 with Python's ``round`` on the exact float expression ``h * (644 / w) / 14``
(for 640x480 that is 34.50000000000001, so the height is 490, not 476), PIL bicubic resampling on
8-bit RGB, values scaled to [0, 1], and a centre crop when the height exceeds 644. The Qwen2.5-VL
vision tower sees the same tensor with its bottom rows / right columns dropped until the patch grid
is even in both directions (490x644 -> 476x644).

Only numpy and PIL are imported at module level; torch is imported where a tensor is made.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Union

import numpy as np
from PIL import Image

from janus_job.errors import JobError

if TYPE_CHECKING:
    import torch

VGGT_TARGET_WIDTH = 644
PATCH_SIZE = 14
MERGE_SIZE = 2

FrameSource = Union[str, os.PathLike, bytes, IO[bytes], Image.Image]


class FrameError(JobError):
    """A frame that cannot be decoded; ``reason`` says why without naming the frame
    ("does not exist", "is not a readable image (...)")."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_frame(source: FrameSource, name: str | None = None) -> np.ndarray:
    """Decode an image to ``uint8 (H, W, 3)`` RGB exactly as the reference does.

    RGBA is composited onto white first; every other mode goes through PIL's ``convert("RGB")``
    (so, like the reference, no EXIF rotation and no blending for LA/P transparency). ``name``
    is what errors call the frame (its path); a path source names itself.
    """
    if isinstance(source, Image.Image):
        return _to_rgb_array(source)
    label = name or frame_label(source)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as img:
            img.load()
            return _to_rgb_array(img)
    except FileNotFoundError as err:
        raise FrameError(f"frame {label} does not exist; check the annotation's image paths",
                         "does not exist") from err
    except (Image.UnidentifiedImageError, OSError) as err:
        reason = str(err).replace(repr(source), "the data") if not isinstance(source, (str, os.PathLike)) else err
        raise FrameError(f"frame {label} is not a readable image ({reason}); re-extract or drop it",
                         f"is not a readable image ({reason})") from err


def frame_label(source: FrameSource) -> str:
    """How an error names a frame source: its path, else what it is (never an object's repr)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    found = getattr(source, "name", None)
    return found if isinstance(found, str) else f"<{type(source).__name__}>"


def frame_problem(path: str | os.PathLike) -> str | None:
    """Why a frame file cannot be used (missing, or no readable image header), else None.

    Cheap: reads the header only, so a file broken further in is found when it is decoded.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        return "does not exist"
    except (Image.UnidentifiedImageError, OSError) as err:
        return f"is not a readable image ({err})"
    if width <= 0 or height <= 0:
        return f"is not a readable image (size {width}x{height})"
    return None


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8).copy()


def vggt_resized_size(width: int, height: int, target_width: int = VGGT_TARGET_WIDTH,
                      patch: int = PATCH_SIZE) -> tuple[int, int]:
    """``(height, width)`` after the crop-mode resize, before the centre crop.

    The float expression is evaluated in the reference's order on purpose: Python's round
    (half to even) on ``h * (t / w) / p`` differs from integer arithmetic at exact halves.
    """
    if width <= 0 or height <= 0:
        raise JobError(f"frame size {width}x{height} is empty; the image is corrupt")
    new_height = round(height * (target_width / width) / patch) * patch
    if new_height <= 0:
        raise JobError(
            f"frame size {width}x{height} is too flat: its height rounds to 0 at width "
            f"{target_width}; drop the frame"
        )
    return new_height, target_width


def vggt_image_size(width: int, height: int, target_width: int = VGGT_TARGET_WIDTH,
                    patch: int = PATCH_SIZE) -> tuple[int, int]:
    """``(H, W)`` of the preprocessed frame (640x480 -> (490, 644))."""
    new_height, new_width = vggt_resized_size(width, height, target_width, patch)
    return min(new_height, target_width), new_width


def vggt_patch_grid(width: int, height: int, target_width: int = VGGT_TARGET_WIDTH,
                    patch: int = PATCH_SIZE) -> tuple[int, int]:
    """VGGT patch grid ``(Hp, Wp)`` of a frame of the given source size (640x480 -> (35, 46))."""
    h, w = vggt_image_size(width, height, target_width, patch)
    return h // patch, w // patch


def even_grid(rows: int, cols: int, merge: int = MERGE_SIZE) -> tuple[int, int]:
    """The grid cropped to multiples of ``merge`` ((35, 46) -> (34, 46))."""
    return rows // merge * merge, cols // merge * merge


def qwen_image_size(height: int, width: int, patch: int = PATCH_SIZE,
                    merge: int = MERGE_SIZE) -> tuple[int, int]:
    """``(H, W)`` after ``crop_to_even_patch_grid`` ((490, 644) -> (476, 644)).

    Same rule as JanusVLN's data loader: drop ``(n // patch) % merge`` whole patches; any
    remainder smaller than a patch is kept (the Qwen image processor deals with it).
    """
    return (height - (height // patch) % merge * patch,
            width - (width // patch) % merge * patch)


@dataclass(frozen=True)
class FrameGeometry:
    """Everything downstream needs to know about one source frame size."""

    source_width: int
    source_height: int
    vggt_height: int
    vggt_width: int
    vggt_grid: tuple[int, int]
    spatial_grid: tuple[int, int]
    qwen_height: int
    qwen_width: int
    qwen_grid: tuple[int, int]
    tokens_per_image: int


def frame_geometry(width: int, height: int, target_width: int = VGGT_TARGET_WIDTH,
                   patch: int = PATCH_SIZE, merge: int = MERGE_SIZE) -> FrameGeometry:
    """Geometry of the official pipeline for a source frame (640x480 -> 391 tokens per image)."""
    vh, vw = vggt_image_size(width, height, target_width, patch)
    grid = (vh // patch, vw // patch)
    qh, qw = qwen_image_size(vh, vw, patch, merge)
    qgrid = (qh // patch, qw // patch)
    return FrameGeometry(
        source_width=width,
        source_height=height,
        vggt_height=vh,
        vggt_width=vw,
        vggt_grid=grid,
        spatial_grid=even_grid(*grid, merge=merge),
        qwen_height=qh,
        qwen_width=qw,
        qwen_grid=qgrid,
        tokens_per_image=(qgrid[0] * qgrid[1]) // (merge * merge),
    )


def preprocess_for_vggt(rgb: np.ndarray | Image.Image, target_width: int = VGGT_TARGET_WIDTH,
                        patch: int = PATCH_SIZE) -> "torch.Tensor":
    """``uint8 (H, W, 3)`` -> ``float32 (3, H', W')`` in [0, 1], bit-equal to the reference."""
    import torch

    if isinstance(rgb, Image.Image):
        rgb = _to_rgb_array(rgb)
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3
            and rgb.shape[2] == 3):
        got = f"{type(rgb).__name__} {getattr(rgb, 'dtype', '')} {getattr(rgb, 'shape', '')}"
        raise JobError(f"preprocess_for_vggt expects a uint8 (H, W, 3) RGB array, got {got}")
    height, width = rgb.shape[:2]
    new_height, new_width = vggt_resized_size(width, height, target_width, patch)
    resized = Image.fromarray(rgb).resize((new_width, new_height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1)
    image = pixels.contiguous().to(torch.float32).div(255)
    if new_height > target_width:
        top = (new_height - target_width) // 2
        image = image[:, top:top + target_width, :].contiguous()
    return image


def crop_to_even_patch_grid(img: "torch.Tensor", patch: int = PATCH_SIZE,
                            merge: int = MERGE_SIZE) -> "torch.Tensor":
    """Keep the top-left part of ``(..., H, W)`` whose patch grid is even (the Qwen input)."""
    height, width = img.shape[-2:]
    qh, qw = qwen_image_size(height, width, patch, merge)
    return img[..., :qh, :qw]

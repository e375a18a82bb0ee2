"""Frame decode and VGGT/Qwen preprocessing, checked against hand-derivable cases."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from janus_job.data.frames import (
    crop_to_even_patch_grid,
    frame_geometry,
    load_frame,
    preprocess_for_vggt,
    qwen_image_size,
    vggt_image_size,
    vggt_patch_grid,
)
from janus_job.errors import JobError


def gradient(height: int, width: int) -> np.ndarray:
    """Row index in red, column index in green, a fixed blue: every pixel tells where it was."""
    rows = np.arange(height)[:, None].repeat(width, 1) % 256
    cols = np.arange(width)[None, :].repeat(height, 0) % 256
    return np.stack([rows, cols, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def test_official_geometry():
    # 480 * (644 / 640) / 14 is 34.50000000000001 in floats, so round() gives 35 -> 490 rows
    assert vggt_image_size(640, 480) == (490, 644)
    assert vggt_patch_grid(640, 480) == (35, 46)
    g = frame_geometry(640, 480)
    assert (g.vggt_height, g.vggt_width) == (490, 644)
    assert g.spatial_grid == (34, 46)
    assert (g.qwen_height, g.qwen_width) == (476, 644)
    assert g.qwen_grid == (34, 46)
    assert g.tokens_per_image == 391


def test_height_rounding_is_pythons_round_on_the_reference_expression():
    # 644x35: 35 * 1.0 / 14 = 2.5 exactly -> round half to even -> 2 -> 28 rows (half-up: 42)
    assert vggt_image_size(644, 35) == (28, 644)
    # 644x21: 1.5 -> 2 -> 28 rows
    assert vggt_image_size(644, 21) == (28, 644)
    # taller than wide: resized to 1288 rows, centre-cropped to 644
    assert vggt_image_size(644, 1288) == (644, 644)
    with pytest.raises(JobError, match="too flat"):
        vggt_image_size(644, 6)


def test_identity_size_is_exact_pixels_over_255():
    rgb = gradient(490, 644)
    out = preprocess_for_vggt(rgb)
    assert out.dtype == torch.float32 and out.shape == (3, 490, 644)
    assert torch.equal(out, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


def test_tall_frame_is_centre_cropped():
    rgb = gradient(1288, 644)  # resize is the identity, then rows 322..965 are kept
    out = preprocess_for_vggt(rgb)
    assert out.shape == (3, 644, 644)
    expected_rows = (np.arange(322, 966) % 256) / 255
    assert torch.equal(out[0, :, 0], torch.tensor(expected_rows, dtype=torch.float32))
    assert torch.equal(out[1, 0, :5], torch.tensor([0, 1, 2, 3, 4], dtype=torch.float32) / 255)


def test_resize_is_pil_bicubic_on_uint8():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    out = preprocess_for_vggt(rgb)
    assert out.shape == (3, 490, 644)
    bicubic = np.asarray(Image.fromarray(rgb).resize((644, 490), Image.Resampling.BICUBIC))
    bilinear = np.asarray(Image.fromarray(rgb).resize((644, 490), Image.Resampling.BILINEAR))
    assert torch.equal(out, torch.from_numpy(bicubic.copy()).permute(2, 0, 1).float() / 255)
    assert not np.array_equal(bicubic, bilinear)  # the check above tells the filters apart
    flat = np.full((480, 640, 3), 200, dtype=np.uint8)  # bicubic keeps a flat image flat
    assert torch.equal(preprocess_for_vggt(flat), torch.full((3, 490, 644), 200 / 255))


def test_load_frame_png_jpeg_rgba_and_gray(tmp_path):
    rgb = gradient(48, 64)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(load_frame(tmp_path / "a.png"), rgb)
    assert np.array_equal(load_frame(str(tmp_path / "a.png")), rgb)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    decoded = load_frame(buf.getvalue())
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red
    rgba[0, 1] = (255, 0, 0, 0)  # transparent becomes white
    rgba[1, 0] = (0, 0, 255, 128)  # half blue over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    out = load_frame(tmp_path / "b.png")
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0, 2] == 255 and 120 <= out[1, 0, 0] <= 135

    Image.fromarray(np.full((3, 3), 9, dtype=np.uint8), "L").save(tmp_path / "g.png")
    assert load_frame(tmp_path / "g.png").tolist() == [[[9, 9, 9]] * 3] * 3


def test_bad_frames_raise_job_error(tmp_path):
    with pytest.raises(JobError, match="does not exist"):
        load_frame(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(JobError, match="not a readable image"):
        load_frame(tmp_path / "bad.jpg")
    with pytest.raises(JobError, match="uint8"):
        preprocess_for_vggt(np.zeros((4, 4, 3), dtype=np.float32))


def test_crop_to_even_patch_grid_keeps_top_left():
    img = torch.arange(490 * 644, dtype=torch.float32).view(1, 490, 644).expand(3, -1, -1)
    out = crop_to_even_patch_grid(img)
    assert out.shape == (3, 476, 644)
    assert torch.equal(out, img[:, :476, :644])
    assert qwen_image_size(490, 658) == (476, 644)  # 47 columns of patches -> 46
    assert qwen_image_size(476, 650) == (476, 650)  # 46 patches + a 6 px remainder: kept

"""Dataset, tokenisation and collation: JanusVLN's labels, errors by sample id, the batch contract."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from janus_job.data import dataset as data
from janus_job.data import frames
from janus_job.data.annotations import Sample
from janus_job.demo import tiny
from janus_job.errors import JobError

TARGET_WIDTH = 224
ANSWER = "The next action is turn left 15 degrees."


@pytest.fixture(scope="module")
def processor():
    return tiny.tiny_processor()


@pytest.fixture()
def root(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(tmp_path / f"f{i}.png")
    return tmp_path


def sample(root, sample_id="ep/4", frame_ids=(0, 1, 2), human=None, answer=ANSWER) -> Sample:
    images = tuple(f"f{i}.png" for i in frame_ids)
    human = human or ("Go to the sofa. History: " + "<image>" * (len(images) - 1) + " Now: <image>\nNext?")
    return Sample(id=sample_id, images=images,
                  conversations=({"from": "human", "value": human}, {"from": "gpt", "value": answer}),
                  frame_paths=tuple(os.path.join(root, i) for i in images))


def test_labels_cover_only_the_assistant_answer(processor):
    tok = processor.tokenizer
    s = Sample(id="x", images=("a.png", "b.png"),
               conversations=({"from": "human", "value": "<image>\nWalk. Now <image> next?"},
                              {"from": "gpt", "value": ANSWER}))
    input_ids, labels = data.tokenize_sample(s, tok, [3, 5])
    assert len(input_ids) == len(labels)
    supervised = [t for t in labels if t != data.IGNORE_INDEX]
    assert tok.decode(supervised) == ANSWER + "<|im_end|>\n"
    # everything before the answer is masked, the answer sits at the end
    first = labels.index(supervised[0])
    assert all(t == data.IGNORE_INDEX for t in labels[:first])
    assert labels[first:] == input_ids[first:]
    text = tok.decode(input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|im_start|>assistant\n" + ANSWER in text
    # <image>\n in the first turn becomes <image> (JanusVLN), placeholders expand to the token counts
    assert "<|vision_end|>Walk" in text
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert input_ids.count(pad) == 8
    assert input_ids.count(tok.convert_tokens_to_ids("<|vision_start|>")) == 2


def test_expanding_one_pad_equals_tokenising_the_expanded_text(processor):
    tok = processor.tokenizer
    s = Sample(id="x", images=("a", "b"),
               conversations=({"from": "human", "value": "hist <image> cur <image> what next?"},
                              {"from": "gpt", "value": "stop"}))
    input_ids, _ = data.tokenize_sample(s, tok, [4, 2])
    expanded = ("hist <|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|> cur <|vision_start|>"
                + "<|image_pad|>" * 2 + "<|vision_end|> what next?")
    reference = []
    for role, content in (("system", data.SYSTEM_MESSAGE), ("user", expanded), ("assistant", "stop")):
        text = f"<|im_start|>{role}\n{content}<|im_end|>\n"
        reference += tok(text, add_special_tokens=False)["input_ids"]
    assert input_ids == reference


def test_placeholder_count_must_match_images(processor):
    s = Sample(id="ep/bad", images=("a", "b"),
               conversations=({"from": "human", "value": "only one <image>"}, {"from": "gpt", "value": "stop"}))
    with pytest.raises(JobError, match="ep/bad"):
        data.tokenize_sample(s, processor.tokenizer, [4, 4])


def test_online_item_matches_the_shared_preprocessing(processor, root):
    s = sample(root)
    item = data.JanusDataset([s], processor, spatial="online", vision="online",
                             target_width=TARGET_WIDTH)[0]
    expected = [frames.preprocess_for_vggt(frames.load_frame(p), TARGET_WIDTH) for p in s.frame_paths]
    torch.testing.assert_close(item["vggt_frames"], torch.stack(expected), rtol=0, atol=0)
    cropped = [frames.crop_to_even_patch_grid(x) for x in expected]
    ref = processor.image_processor(images=cropped, return_tensors="pt", do_rescale=False)
    torch.testing.assert_close(item["pixel_values"], ref["pixel_values"])
    geometry = frames.frame_geometry(160, 120, TARGET_WIDTH)
    assert item["image_grid_thw"].tolist() == [[1, *geometry.qwen_grid]] * 3
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((item["input_ids"] == pad).sum()) == 3 * geometry.tokens_per_image


def test_missing_frame_is_reported_with_sample_id_and_path(processor, root):
    os.remove(root / "f1.png")
    ds = data.JanusDataset([sample(root, "ep/missing")], processor, spatial="online", vision="online",
                           target_width=TARGET_WIDTH)
    with pytest.raises(JobError) as err:
        ds[0]
    assert "ep/missing" in str(err.value) and str(root / "f1.png") in str(err.value)


def test_unreadable_frame_is_reported_with_sample_id_and_path(processor, root):
    (root / "f2.png").write_bytes(b"not a png at all")
    ds = data.JanusDataset([sample(root, "ep/corrupt")], processor, spatial="online", vision="cached",
                           features=tiny.MemoryFeatureSource({}, {}), target_width=TARGET_WIDTH)
    with pytest.raises(JobError) as err:
        ds[0]
    assert "ep/corrupt" in str(err.value) and str(root / "f2.png") in str(err.value)


def test_the_frame_pre_pass_names_missing_and_unreadable_frames_and_their_samples(processor, root):
    """What the trainer runs before building the sampler when the encoders run online under skip."""
    os.remove(root / "f1.png")
    (root / "f2.png").write_bytes(b"not a png at all")
    samples = [sample(root, "a", (0,)), sample(root, "b", (0, 1)), sample(root, "c", (2, 3)),
               sample(root, "d", (3,))]
    paths = sorted({p for s in samples for p in s.frame_paths})
    problems = data.unreadable_frames(paths)
    assert problems.keys() == {str(root / "f1.png"), str(root / "f2.png")}
    assert problems[str(root / "f1.png")] == "does not exist"
    assert problems[str(root / "f2.png")].startswith("is not a readable image (")
    dropped = data.bad_frame_samples(samples, problems)
    assert list(dropped) == ["b", "c"]
    assert dropped["b"] == f"sample b: frame f1.png ({root / 'f1.png'}): does not exist"

    kept = [s for s in samples if s.id not in dropped]
    ds = data.JanusDataset(kept, processor, spatial="online", vision="online", target_width=TARGET_WIDTH,
                           on_bad_sample="skip", max_bad_fraction=0.5, dropped=dropped)
    assert [ds[k]["sample_id"] for k in range(len(ds))] == ["a", "d"]
    with pytest.raises(JobError) as over:  # 2 of 4 is more than a quarter
        data.JanusDataset(kept, processor, spatial="online", vision="online", target_width=TARGET_WIDTH,
                          on_bad_sample="skip", max_bad_fraction=0.25, dropped=dropped)
    assert str(over.value).startswith("2 of 4 samples have missing or unreadable frames, more than "
                                      "data.max_bad_fraction 0.25 allows (first: sample b: frame f1.png (")
    assert "or raise data.max_bad_fraction" in str(over.value)


def test_a_frame_that_fails_to_decode_is_replaced_under_skip(processor, root):
    """The header passes the pre-pass, the decode fails: the sample is replaced by the next one and
    counted, so every rank still gets full micro-batches."""
    whole = (root / "f1.png").read_bytes()
    (root / "f1.png").write_bytes(whole[: len(whole) // 2])  # truncated: header fine, pixels not
    assert frames.frame_problem(root / "f1.png") is None
    samples = [sample(root, "a", (0,)), sample(root, "b", (1,)), sample(root, "c", (2,))]
    ds = data.JanusDataset(samples, processor, spatial="online", vision="online", target_width=TARGET_WIDTH,
                           on_bad_sample="skip", max_bad_fraction=0.5)
    item = ds[1]
    assert item["sample_id"] == "c" and item["bad_samples"] == ["b"]
    assert ds.bad == {"b": str(root / "f1.png")}
    failing = data.JanusDataset(samples, processor, spatial="online", vision="online", target_width=TARGET_WIDTH)
    with pytest.raises(JobError, match=rf"sample b: frame f1.png \({root / 'f1.png'}\): ") as caught:
        failing[1]
    assert "restarted run" not in str(caught.value) and "data.on_bad_sample: fail" in str(caught.value)


def test_missing_cached_feature_names_the_sample(processor, root):
    ds = data.JanusDataset([sample(root, "ep/nofeat")], processor, tiny.MemoryFeatureSource({}, {}),
                           target_width=TARGET_WIDTH)
    with pytest.raises(JobError, match="ep/nofeat"):
        ds[0]


def test_cached_vision_with_a_wrong_grid_is_rejected(processor, root):
    s = sample(root, "ep/grid", (0,))
    source = tiny.MemoryFeatureSource({"ep/grid": torch.zeros(12, 16, 8)}, {"f0.png": torch.zeros(100, 32)})
    with pytest.raises(JobError, match="re-run precompute"):
        data.JanusDataset([s], processor, source, target_width=TARGET_WIDTH)[0]


def test_resolution_bounds_that_resize_frames_are_rejected(processor, root):
    small = tiny.tiny_processor(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    ds = data.JanusDataset([sample(root, "ep/big")], small, spatial="online", vision="online",
                           target_width=TARGET_WIDTH)
    with pytest.raises(JobError, match="max_pixels"):
        ds[0]


def test_collator_builds_the_batch_contract(processor, root):
    samples = [sample(root, "a", (0,)), sample(root, "b", (1, 2, 3)), sample(root, "c", (0, 3))]
    spatial = {s.id: torch.randn(12, 16, 8) for s in samples}
    vision = {f"f{i}.png": torch.randn(192, 32) for i in range(4)}
    ds = data.JanusDataset(samples, processor, tiny.MemoryFeatureSource(spatial, vision), target_width=TARGET_WIDTH)
    items = [ds[i] for i in range(3)]
    batch = data.JanusCollator(processor.tokenizer.pad_token_id)(items)
    lengths = [it["input_ids"].shape[0] for it in items]
    assert batch["input_ids"].shape == (3, max(lengths))
    for b, n in enumerate(lengths):
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][b, n:] == -100).all()
        assert (batch["input_ids"][b, n:] == processor.tokenizer.pad_token_id).all()
    assert batch["images_per_sample"].tolist() == [1, 3, 2]
    assert batch["image_grid_thw"].tolist() == [[1, 12, 16]] * 6
    order = ["f0.png", "f1.png", "f2.png", "f3.png", "f0.png", "f3.png"]
    torch.testing.assert_close(batch["vision_features"], torch.cat([vision[r] for r in order]))
    torch.testing.assert_close(batch["spatial_features"], torch.stack([spatial[s.id] for s in samples]))
    assert batch["sample_ids"] == ["a", "b", "c"]
    assert "pixel_values" not in batch and "vggt_frames" not in batch


def test_collator_refuses_to_truncate_image_tokens(processor, root):
    item = data.JanusDataset([sample(root)], processor, spatial="online", vision="online",
                             target_width=TARGET_WIDTH)[0]
    with pytest.raises(JobError, match="max length"):
        data.JanusCollator(processor.tokenizer.pad_token_id, max_length=10)([item])


def test_token_length_estimate_is_close(processor, root):
    samples = [sample(root, "a", (0,)), sample(root, "b", (0, 1, 2, 3))]
    ds = data.JanusDataset(samples, processor, spatial="online", vision="online",
                           target_width=TARGET_WIDTH)
    estimates = ds.token_lengths()
    actual = [ds[i]["input_ids"].shape[0] for i in range(2)]
    for est, real in zip(estimates, actual):
        assert abs(est - real) / real < 0.25
    assert estimates[1] > estimates[0]
    sized = data.JanusDataset(samples, processor, spatial="online", vision="online",
                              target_width=TARGET_WIDTH, frame_size=(160, 120))
    assert sized.token_lengths() == estimates
    # the official geometry: 9 frames of 640x480 -> 9 x 391 visual tokens
    official = Sample(id="o", images=tuple(f"{i}.jpg" for i in range(9)),
                      conversations=({"from": "human", "value": "<image>" * 9 + " go"},
                                     {"from": "gpt", "value": "stop"}))
    assert 9 * 391 < data.sample_token_length(official) < 9 * 391 + 60


def test_load_processor_reads_a_qwen_directory_and_pixel_bounds(processor, tmp_path):
    processor.tokenizer.save_pretrained(str(tmp_path))
    processor.image_processor.save_pretrained(str(tmp_path))
    loaded = data.load_processor(str(tmp_path), min_pixels=8 * 28 * 28, max_pixels=300 * 28 * 28)
    text = "hi <|vision_start|><|image_pad|><|vision_end|>"
    assert loaded.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    image = torch.rand(3, 28 * 30, 28 * 30)  # 900 merge units > 300: resized down
    out = loaded.image_processor(images=[image], return_tensors="pt", do_rescale=False)
    t, h, w = out["image_grid_thw"][0].tolist()
    assert h * w <= 300 * 4 and h * w >= 8 * 4


def test_dataloader_workers_produce_the_same_batches(processor, root):
    samples = [sample(root, "a", (0,)), sample(root, "b", (1, 2)), sample(root, "c", (3,))]
    ds = data.JanusDataset(samples, processor, spatial="online", vision="online", target_width=TARGET_WIDTH)
    collate = data.JanusCollator(processor.tokenizer.pad_token_id)
    inline = list(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate))
    workers = list(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate, num_workers=2,
                                               pin_memory=False, prefetch_factor=2))
    assert len(inline) == len(workers) == 2
    for a, b in zip(inline, workers):
        assert a["sample_ids"] == b["sample_ids"]
        for key in ("input_ids", "labels", "pixel_values", "image_grid_thw"):
            assert torch.equal(a[key], b[key])

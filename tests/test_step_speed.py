"""The step without host synchronisations: loader-made positions and indices give the model's own values.

The collator computes what the forward used to find out on the GPU (mRoPE positions, where the
image embeddings go, where the loss runs); these tests hold the loader's values equal to the
model's own computation and the loss and gradients equal with and without them, on tiny models
(CPU). Regional compilation is checked the same way through torch.compile's graph capture.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image

from janus_job.data import dataset as data
from janus_job.data.annotations import Sample
from janus_job.demo import tiny
from janus_job.errors import JobError
from janus_job.models.janusvln import build as janus_model
from janus_job.train.engine import HOST_KEYS, to_device

TARGET_WIDTH = 224


def _sample(root, sample_id: str, frame_ids, answer: str = "The next action is stop.") -> Sample:
    images = tuple(f"f{i}.png" for i in frame_ids)
    human = f"Walk to the sofa. History: {'<image>' * (len(images) - 1)}. Current: <image>\nNext?"
    return Sample(id=sample_id, images=images,
                  conversations=({"from": "human", "value": human}, {"from": "gpt", "value": answer}),
                  frame_paths=tuple(os.path.join(root, image) for image in images))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("frames"))
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(os.path.join(root, f"f{i}.png"))
    torch.manual_seed(0)
    processor = tiny.tiny_processor()
    model = janus_model.model_from_config(tiny.tiny_qwen_config(processor.tokenizer), tiny.tiny_vggt_config(),
                                          dtype=torch.float32)
    model.train()
    samples = [_sample(root, "ep1/3", [0]), _sample(root, "ep2/7", [1, 2, 3, 4]),
               _sample(root, "ep3/2", [4, 0], answer="The next action is turn left 15 degrees.")]
    features = tiny.MemoryFeatureSource.computed(model, samples, TARGET_WIDTH, processor.image_processor)
    dataset = data.JanusDataset(samples, processor, features, spatial="cached", vision="cached",
                                target_width=TARGET_WIDTH)
    items = [dataset[i] for i in range(len(samples))]
    config = model.config
    collate = data.JanusCollator(processor.tokenizer.pad_token_id, image_token_id=config.image_token_id,
                                 spatial_merge_size=config.vision_config.spatial_merge_size)
    return dict(model=model, items=items, collate=collate, pad=processor.tokenizer.pad_token_id)


def _without_loader_keys(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("position_ids", "image_index", "label_index")}


@pytest.mark.parametrize("indices", [[1], [0, 1, 2]], ids=["one_sample", "padded_micro_batch"])
def test_loader_positions_equal_the_models_own(world, indices):
    model = world["model"]
    batch = world["collate"]([world["items"][i] for i in indices])
    image_mask = batch["input_ids"] == model.config.image_token_id
    expected, _ = model.model.get_rope_index(batch["input_ids"], image_mask.int(),
                                             image_grid_thw=batch["image_grid_thw"],
                                             attention_mask=batch["attention_mask"])
    assert batch["position_ids"].shape == (3, len(indices), batch["input_ids"].shape[1])
    assert torch.equal(batch["position_ids"], expected)
    # the indices name exactly the image tokens and the positions whose next token is labelled
    assert torch.equal(batch["image_index"], torch.nonzero(image_mask.flatten()).flatten())
    flat_labels = batch["labels"].flatten()
    assert bool((flat_labels[batch["label_index"] + 1] != -100).all())
    assert batch["label_index"].numel() == int((batch["labels"][:, 1:] != -100).sum())


def test_loss_and_gradients_equal_with_and_without_loader_indices(world):
    model = world["model"]
    batch = world["collate"](world["items"])
    grads = []
    losses = []
    for b in (batch, _without_loader_keys(batch)):
        model.zero_grad(set_to_none=True)
        out = model(**b)
        out.loss.backward()
        losses.append(out.loss.detach())
        assert int(out.num_label_tokens) == batch["label_index"].numel()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("indices", [[1], [0, 1, 2]], ids=["one_sample", "padded_micro_batch"])
def test_padding_to_a_multiple_of_16_changes_no_loss_or_gradient(world, indices):
    """training.precision fp8 collates to a multiple of 16 tokens: pads after every real token, unseen by
    them (causal attention), unlabelled; a one-sample batch keeps an all-ones mask (no masked kernels)."""
    model, items = world["model"], [world["items"][i] for i in indices]
    plain = world["collate"](items)
    padded = data.JanusCollator(world["pad"], image_token_id=model.config.image_token_id,
                                spatial_merge_size=model.config.vision_config.spatial_merge_size,
                                pad_to_multiple_of=16)(items)
    longest = plain["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] % 16 == 0 and longest < padded["input_ids"].shape[1] < longest + 16
    assert bool((padded["labels"][:, longest:] == -100).all())
    assert bool((padded["input_ids"][:, longest:] == world["pad"]).all())
    if len(indices) == 1:
        assert bool(padded["attention_mask"].all())
    losses, grads = [], []
    for batch in (plain, padded):
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=0)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


def test_collator_refuses_image_tokens_that_disagree_with_the_grid(world):
    item = dict(world["items"][1])
    grid = item["image_grid_thw"].clone()
    grid[0, 2] += 2  # one image claims a wider patch grid than its tokens
    item["image_grid_thw"] = grid
    with pytest.raises(JobError, match=r"sample ep2/7: image 0 has \d+ placeholder tokens"):
        world["collate"]([item])


def test_model_refuses_an_image_index_of_the_wrong_length(world):
    batch = world["collate"]([world["items"][1]])
    batch["image_index"] = batch["image_index"][:-1]
    with pytest.raises(JobError, match="image placeholder tokens but"):
        world["model"](**batch)


def test_to_device_keeps_the_host_metadata_on_the_host(world):
    batch = world["collate"](world["items"])
    moved = to_device(batch, torch.device("cpu"))
    assert HOST_KEYS <= set(moved)
    for key in HOST_KEYS:
        assert moved[key] is batch[key]


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_eager_loss_and_gradients(world):
    from janus_job.models.janusvln.compile import compile_decoder_layers

    eager = world["model"]
    compiled = copy.deepcopy(eager)
    assert compile_decoder_layers(compiled.model.language_model, backend="aot_eager") == \
        eager.config.text_config.num_hidden_layers
    for indices in ([1], [0], [0, 1, 2]):  # three sequence lengths: one dynamic graph
        batch = world["collate"]([world["items"][i] for i in indices])
        results = []
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            loss = m(**batch).loss
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        (l0, g0), (l1, g1) = results
        assert torch.allclose(l0, l1, rtol=1e-5, atol=0)
        assert g0.keys() == g1.keys()
        for name in g0:
            assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-6), name

"""JanusVLN model on tiny random encoders: cached == online, per-sample blend, loss."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from janus_job.data import dataset as data
from janus_job.data.annotations import Sample
from janus_job.demo import tiny
from janus_job.errors import JobError
from janus_job.models.janusvln import build
from janus_job.models.janusvln import model as janus_model
from janus_job.train import engine

TARGET_WIDTH = 224  # 160x120 frames -> 168x224 -> 12x16 patches: 6x8 merge units, 2x2 windows


def _frames(root, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, f"f{i}.png"))


def make_sample(root, sample_id: str, frame_ids, answer: str = "The next action is stop.") -> Sample:
    images = tuple(f"f{i}.png" for i in frame_ids)
    history = "<image>" * (len(images) - 1)
    human = f"Walk to the sofa. These are your historical observations: {history}. Current: <image>\nNext?"
    return Sample(id=sample_id, images=images,
                  conversations=({"from": "human", "value": human}, {"from": "gpt", "value": answer}),
                  frame_paths=tuple(os.path.join(root, image) for image in images))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("frames"))
    _frames(root, 6)
    torch.manual_seed(0)
    processor = tiny.tiny_processor()
    model = build.model_from_config(tiny.tiny_qwen_config(processor.tokenizer),
                                          tiny.tiny_vggt_config(), dtype=torch.float32)
    model.eval()
    with torch.no_grad():  # random init is nearly blind to its inputs (loss ~ ln V): sharpen it
        model.merger.mlp[2].weight.mul_(20)
        model.model.visual.merger.mlp[2].weight.mul_(20)
        model.lm_head.weight.mul_(50)
    samples = [make_sample(root, "ep1/3", [0]), make_sample(root, "ep2/7", [1, 2, 3, 4]),
               make_sample(root, "ep3/2", [5, 0], answer="The next action is turn left 15 degrees.")]
    features = tiny.MemoryFeatureSource.computed(model, samples, TARGET_WIDTH, processor.image_processor)
    collate = data.JanusCollator(processor.tokenizer.pad_token_id)

    def dataset(spatial, vision):
        return data.JanusDataset(samples, processor, features, spatial=spatial, vision=vision,
                                 target_width=TARGET_WIDTH)

    return dict(root=root, processor=processor, model=model, samples=samples, features=features,
                collate=collate, dataset=dataset)


def _batch(world, spatial, vision, indices):
    ds = world["dataset"](spatial, vision)
    return world["collate"]([ds[i] for i in indices])


def _rel(a, b) -> float:
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("indices", [[1], [0, 1, 2]], ids=["micro_batch_1", "micro_batch_3"])
def test_cached_features_give_the_online_loss(world, indices):
    model = world["model"]
    with torch.no_grad():
        online = model(**_batch(world, "online", "online", indices)).loss
        cached = model(**_batch(world, "cached", "cached", indices)).loss
        mixed = model(**_batch(world, "cached", "online", indices)).loss
    assert _rel(cached, online) <= 1e-6
    assert _rel(mixed, online) <= 1e-6


def test_cached_batch_reads_no_frames(world, tmp_path):
    """Both features cached: the dataset never opens an image (the frames may be gone)."""
    moved = [Sample(id=s.id, images=s.images, conversations=s.conversations,
                    frame_paths=tuple(str(tmp_path / "absent" / p) for p in s.images))
             for s in world["samples"]]
    ds = data.JanusDataset(moved, world["processor"], world["features"], "cached", "cached",
                           target_width=TARGET_WIDTH)
    item = ds[1]
    assert item["image_grid_thw"].tolist() == [[1, 12, 16]] * 4
    assert "pixel_values" not in item and "vggt_frames" not in item


def test_micro_batch_loss_is_token_weighted_mean_of_single_samples(world):
    """Padding, per-sample rope positions and masking do not leak between samples."""
    model = world["model"]
    with torch.no_grad():
        joint = model(**_batch(world, "cached", "cached", [0, 1, 2]))
        parts = [model(**_batch(world, "cached", "cached", [i])) for i in range(3)]
    total = sum(float(p.loss) * int(p.num_label_tokens) for p in parts)
    count = sum(int(p.num_label_tokens) for p in parts)
    assert int(joint.num_label_tokens) == count
    assert _rel(joint.loss, total / count) <= 1e-5


def test_blend_adds_each_samples_own_spatial_map_to_all_its_images(world):
    model = world["model"]
    batch = _batch(world, "cached", "cached", [0, 1, 2])  # 1, 4 and 2 images
    with torch.no_grad():
        embeds, _, _ = model.image_embeddings(
            batch["input_ids"], batch["image_grid_thw"], batch["images_per_sample"],
            vision_features=batch["vision_features"], spatial_features=batch["spatial_features"])
        plain = model.model.visual.merger(batch["vision_features"])
        spatial = model.merger(batch["spatial_features"])  # (3, tokens, hidden)
    tokens = spatial.shape[1]
    owners = [0, 1, 1, 1, 1, 2, 2]
    expected = plain + 0.2 * torch.cat([spatial[o] for o in owners])
    torch.testing.assert_close(embeds, expected, rtol=1e-6, atol=1e-6)
    # JanusVLN's repeat(k, 1) tiles the per-sample maps in sample order instead: wrong at batch > 1
    janus_repeat = spatial.reshape(-1, spatial.shape[-1]).repeat(len(owners) // 3 + 1, 1)
    janus_repeat = janus_repeat[: len(owners) * tokens]
    assert not torch.allclose(plain + 0.2 * janus_repeat, embeds, atol=1e-3)
    # and the blend matters: without it the embeddings differ
    assert not torch.allclose(plain, embeds, atol=1e-3)


def test_spatial_merger_uses_janusvln_merge_order_and_names(world):
    merger = world["model"].merger
    assert sorted(n for n, _ in merger.named_parameters()) == [
        "ln_q.weight", "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]
    features = torch.randn(2, 4, 6, merger.context_dim)
    out = merger(features)
    # token (r, c) of the merged grid concatenates patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1)
    normed = merger.ln_q(features)
    r, c = 1, 2
    unit = torch.cat([normed[1, 2 * r, 2 * c], normed[1, 2 * r, 2 * c + 1],
                      normed[1, 2 * r + 1, 2 * c], normed[1, 2 * r + 1, 2 * c + 1]])
    torch.testing.assert_close(out[1, r * 3 + c], merger.mlp(unit), rtol=1e-4, atol=1e-4)
    with pytest.raises(JobError, match="even"):
        merger(torch.randn(1, 3, 4, merger.context_dim))


def test_restricted_loss_equals_full_vocabulary_cross_entropy():
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.full((3, 11), -100)
    labels[0, 7:10] = torch.tensor([3, 4, 5])
    labels[2, 2:4] = torch.tensor([9, 1])
    labels[1, 10] = 7
    loss, count, _ = janus_model.restricted_lm_loss(head, hidden, labels)
    logits = head(hidden).float()
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    assert int(count) == 6
    assert _rel(loss, full) <= 1e-6
    grad_restricted = torch.autograd.grad(loss, hidden, retain_graph=True)[0]
    grad_full = torch.autograd.grad(full, hidden)[0]
    torch.testing.assert_close(grad_restricted, grad_full)


def test_training_step_updates_only_trainable_parts(world):
    model = world["model"]
    batch = _batch(world, "cached", "cached", [0, 2])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("merger.") for n in trainable)
    assert any(n.startswith("model.visual.merger.") for n in trainable)
    assert any(n.startswith("model.language_model.") for n in trainable)
    assert "lm_head.weight" in trainable
    assert not any(n.startswith(("vggt.", "model.visual.blocks.", "model.visual.patch_embed."))
                   for n in trainable)
    model.zero_grad()
    model(**batch).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable
    model.zero_grad()


def test_gradient_checkpointing_keeps_the_loss(world):
    processor = world["processor"]
    torch.manual_seed(3)
    channels = world["model"].merger.context_dim
    plain = build.model_from_config(tiny.tiny_qwen_config(processor.tokenizer),
                                          spatial_channels=channels)
    torch.manual_seed(3)
    ckpt = build.model_from_config(tiny.tiny_qwen_config(processor.tokenizer),
                                         gradient_checkpointing=True, spatial_channels=channels)
    batch = _batch(world, "cached", "cached", [1])
    plain.train(), ckpt.train()
    a, b = plain(**batch).loss, ckpt(**batch).loss
    a.backward(), b.backward()
    assert _rel(a, b) <= 1e-6
    ga = plain.merger.mlp[0].weight.grad
    gb = ckpt.merger.mlp[0].weight.grad
    torch.testing.assert_close(ga, gb)


def test_param_groups_follow_janusvln(world):
    groups = engine.param_groups(world["model"], lr=2e-5, merger_lr=1e-5, vision_lr=1e-6,
                                      weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert by_name["llm"]["lr"] == 2e-5 and by_name["merger"]["lr"] == 1e-5
    merger_names = by_name["merger"]["param_names"] + by_name["merger_no_decay"]["param_names"]
    assert "merger.mlp.0.weight" in merger_names and "model.visual.merger.mlp.0.weight" in merger_names
    assert all("bias" in n for g in groups if g["name"].endswith("no_decay") for n in g["param_names"])
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))
    counted = sum(len(g["params"]) for g in groups)
    assert counted == sum(1 for p in world["model"].parameters() if p.requires_grad)


def test_online_spatial_needs_an_aggregator(world):
    processor = world["processor"]
    bare = build.model_from_config(tiny.tiny_qwen_config(processor.tokenizer))
    with pytest.raises(JobError, match="no VGGT aggregator"):
        bare(**_batch(world, "online", "cached", [0]))


@pytest.mark.slow
def test_equivalence_bench_tiny_mode(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(repo, "bench", "model_equivalence.py"), "--tiny",
                          "--images", "3,1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=repo)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "model_equivalence_tiny.json").read_text())
    assert result["passed"] and result["rel_error"] <= 1e-6
    assert result["images_per_sample"] == [3, 1] and result["card"] == "cpu"
    assert result["visual_tokens"] == 4 * 48


def test_detached_aggregator_stays_out_of_the_module_tree(world):
    processor = world["processor"]
    registered = world["model"]
    detached = build.model_from_config(tiny.tiny_qwen_config(processor.tokenizer),
                                             tiny.tiny_vggt_config(), register_vggt=False)
    detached.load_state_dict({k: v for k, v in registered.state_dict().items() if not k.startswith("vggt.")})
    detached.aggregator.load_state_dict(registered.aggregator.state_dict())
    detached.eval()
    assert not any(n.startswith("vggt.") for n, _ in detached.named_parameters())
    assert not any(k.startswith("vggt.") for k in detached.state_dict())
    batch = _batch(world, "online", "online", [0, 2])
    with torch.no_grad():
        assert _rel(detached(**batch).loss, registered(**batch).loss) <= 1e-6
    with pytest.raises(TypeError, match="batch contract"):
        detached(**batch, cache_position=None)


def test_build_model_loads_qwen_and_vggt_from_paths_and_urls(world, tmp_path):
    import fsspec
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = world["processor"]
    torch.manual_seed(5)
    qwen = Qwen2_5_VLForConditionalGeneration(tiny.tiny_qwen_config(processor.tokenizer))
    qwen_dir = tmp_path / "qwen"
    qwen.save_pretrained(str(qwen_dir))
    vggt_file = tmp_path / "vggt.safetensors"
    aggregator = world["model"].aggregator
    save_file({"aggregator." + k: v.contiguous() for k, v in aggregator.state_dict().items()}, str(vggt_file))
    memory = fsspec.filesystem("memory")
    for name in os.listdir(qwen_dir):
        memory.pipe(f"/qwen-{os.getpid()}/{name}", (qwen_dir / name).read_bytes())

    for source in (str(qwen_dir), f"memory:///qwen-{os.getpid()}"):
        built = build.build_model(source, vggt=str(vggt_file), dtype=torch.float32,
                                        vggt_config=tiny.tiny_vggt_config(),
                                        cache_dir=str(tmp_path / "cache"))
        ours = built.state_dict()
        for name, tensor in qwen.state_dict().items():
            torch.testing.assert_close(ours[name], tensor, msg=name)
        torch.testing.assert_close(ours["vggt.aggregator.camera_token"], aggregator.camera_token)
        assert torch.equal(built.merger.ln_q.weight, torch.ones_like(built.merger.ln_q.weight))
        assert built.merger.context_dim == 2 * tiny.tiny_vggt_config().embed_dim
    with pytest.raises(JobError, match="not a directory"):
        build.build_model(str(tmp_path / "nope"))

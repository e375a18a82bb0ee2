"""Frame-causal VGGT aggregator on a tiny config: batched == streaming, causality, checkpoints."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from janus_job.errors import JobError
from janus_job.models.vggt import FrameCausalAggregator, VGGTAggregatorConfig, load_aggregator, spatial_features

REPO = Path(__file__).resolve().parents[1]
TINY = VGGTAggregatorConfig.tiny()


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights under which every part matters (stock LayerScale 0.01 would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.25)
            elif p.dim() > 1 and "token" not in name and "pos_embed" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> FrameCausalAggregator:
    return randomize(FrameCausalAggregator(TINY))


def frames(b: int, s: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, s, 3, h, w, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def stream_all(model: FrameCausalAggregator, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    cache = model.new_cache()
    with torch.no_grad():
        return torch.cat([model(x[:, j:j + 1], cache=cache, layer=layer) for j in range(x.shape[1])], 1)


@pytest.mark.parametrize("impl", ["chunked", "mask"])
@pytest.mark.parametrize("s,h,w", [(1, 42, 56), (3, 56, 42), (5, 42, 70), (3, 56, 56)])
def test_batched_equals_streaming(model, impl, s, h, w):
    model.causal_impl = impl
    x = frames(2, s, h, w)
    with torch.no_grad():
        batched = model(x)
    streamed = stream_all(model, x)
    assert batched.shape == (2, s, 5 + (h // 14) * (w // 14), 2 * TINY.embed_dim)
    assert rel(batched, streamed) <= 1e-5
    for mode in ("batched", "streaming"):
        feat = spatial_features(model, x, mode=mode)
        assert feat.shape == (2, h // 28 * 2, w // 28 * 2, 2 * TINY.embed_dim)
        grid = streamed[:, -1, 5:].reshape(2, h // 14, w // 14, -1)[:, : h // 28 * 2, : w // 28 * 2]
        assert rel(feat, grid) <= 1e-5
    model.causal_impl = "chunked"


def test_last_frame_only_equals_all_frames(model):
    x = frames(1, 4, 42, 56)
    with torch.no_grad():
        every = model(x, frames="all")
        last = model(x, frames="last")
    assert last.shape[1] == 1
    assert rel(last, every[:, -1:]) <= 1e-6


def test_global_attention_is_frame_causal(model):
    x = frames(1, 5, 42, 56)
    changed = x.clone()
    changed[:, 3:] = torch.rand_like(changed[:, 3:])
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.allclose(a[:, :3], b[:, :3], rtol=0, atol=1e-6)
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-2  # later frames do see the change
    # and a frame does see earlier frames: changing frame 0 moves frame 2's output
    changed = x.clone()
    changed[:, 0] = torch.rand_like(changed[:, 0])
    with torch.no_grad():
        c = model(changed)
    assert (a[:, 2] - c[:, 2]).abs().max() > 1e-3


def test_first_frame_slot_only_for_frame_zero(model):
    x = frames(1, 1, 42, 56).repeat(1, 3, 1, 1, 1)  # the same image three times
    with torch.no_grad():
        out = model(x, layer=0)
    # frame 1 and 2 see identical inputs and special tokens except for what they attend to
    assert not torch.allclose(out[:, 0, :5], out[:, 1, :5])  # camera/register slot 0 vs 1
    with torch.no_grad():
        frame_half = model(x, layer=0)[..., : TINY.embed_dim]
    assert torch.allclose(frame_half[:, 1], frame_half[:, 2], atol=1e-6)  # frame attn: own frame


def test_feature_layer_is_second_to_last_and_last_layer_skipped(model):
    x = frames(1, 2, 42, 56)
    calls = []
    hook = model.global_blocks[TINY.depth - 1].register_forward_pre_hook(lambda *a: calls.append(1))
    hook2 = model.frame_blocks[TINY.depth - 1].register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        default = model(x)
        explicit = model(x, layer=TINY.depth - 2)
        final = model(x, layer=TINY.depth - 1)
    hook.remove()
    hook2.remove()
    assert torch.equal(default, explicit)
    assert calls == [1]  # only the explicit last-layer call ran the last frame block
    assert rel(final, default) > 1e-2


def test_bad_inputs_raise_job_error(model):
    with pytest.raises(JobError, match="multiples of 14"):
        model(frames(1, 2, 40, 56))
    with pytest.raises(JobError, match=r"\(B, S, 3, H, W\)"):
        model(torch.rand(2, 3, 42, 56))
    cache = model.new_cache()
    with torch.no_grad():
        model(frames(1, 1, 42, 56), cache=cache)
    with pytest.raises(JobError, match="new cache"):
        model(frames(1, 1, 56, 56), cache=cache)


def test_full_config_keys_match_reference_layout():
    with torch.device("meta"):
        full = FrameCausalAggregator(VGGTAggregatorConfig())
    keys = full.state_dict()
    # 2 special-token tensors, 8 DINOv2 stem tensors, 24 DINOv2 blocks x 14, 48 blocks x 18
    assert len(keys) == 2 + 8 + 24 * 14 + 48 * 18
    for name in ("camera_token", "register_token", "patch_embed.mask_token",
                 "patch_embed.patch_embed.proj.weight", "patch_embed.pos_embed",
                 "patch_embed.blocks.23.ls2.gamma", "patch_embed.norm.bias",
                 "frame_blocks.23.attn.q_norm.weight", "global_blocks.0.attn.k_norm.bias",
                 "global_blocks.23.mlp.fc2.weight"):
        assert name in keys
    assert keys["patch_embed.pos_embed"].shape == (1, 37 * 37 + 1, 1024)
    assert keys["register_token"].shape == (1, 2, 4, 1024)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_state(model: FrameCausalAggregator) -> dict[str, torch.Tensor]:
    state = {f"aggregator.{k}": v.clone().contiguous() for k, v in model.state_dict().items()}
    state["camera_head.trunk.0.weight"] = torch.zeros(3, 3)  # heads are ignored
    return state


def test_load_safetensors_and_pt(model, tmp_path):
    from safetensors.torch import save_file

    x = frames(1, 3, 42, 56)
    with torch.no_grad():
        expected = model(x)
    save_file(checkpoint_state(model), tmp_path / "model.safetensors")
    torch.save(checkpoint_state(model), tmp_path / "model.pt")
    for path in (str(tmp_path / "model.safetensors"), str(tmp_path / "model.pt"),
                 f"file://{tmp_path}/model.safetensors"):
        loaded = load_aggregator(path, TINY)
        assert not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            assert torch.equal(loaded(x), expected)


def test_load_from_fsspec_url(model):
    import fsspec
    from safetensors.torch import save

    with fsspec.open("memory://vggt/model.safetensors", "wb") as f:
        f.write(save(checkpoint_state(model)))
    loaded = load_aggregator("memory://vggt/model.safetensors", TINY, dtype=torch.bfloat16)
    assert loaded.camera_token.dtype == torch.bfloat16
    assert torch.equal(loaded.camera_token.float(), model.camera_token.bfloat16().float())


def test_bad_checkpoints_give_clear_errors(model, tmp_path):
    from safetensors.torch import save_file

    state = checkpoint_state(model)
    missing = dict(state)
    del missing["aggregator.global_blocks.1.attn.k_norm.weight"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(JobError, match=r"missing aggregator\.\{global_blocks\.1\.attn\.k_norm\.weight"):
        load_aggregator(str(tmp_path / "missing.safetensors"), TINY)

    extra = dict(state, **{"aggregator.frame_blocks.9.norm1.weight": torch.ones(32)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(JobError, match=r"unexpected aggregator\.\{frame_blocks\.9\.norm1\.weight"):
        load_aggregator(str(tmp_path / "extra.safetensors"), TINY)

    save_file(state, tmp_path / "good.safetensors")
    smaller_pos_grid = VGGTAggregatorConfig(**{**TINY.to_dict(), "img_size": 42})
    with pytest.raises(JobError, match=r"wrong shape for patch_embed\.pos_embed \(1, 17, 32\)"):
        load_aggregator(str(tmp_path / "good.safetensors"), smaller_pos_grid)

    save_file({"camera_head.x": torch.zeros(2)}, tmp_path / "heads.safetensors")
    with pytest.raises(JobError, match="no 'aggregator"):
        load_aggregator(str(tmp_path / "heads.safetensors"), TINY)

    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(JobError, match="not a readable safetensors"):
        load_aggregator(str(tmp_path / "garbage.safetensors"), TINY)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(JobError, match="not a readable torch file"):
        load_aggregator(str(tmp_path / "garbage.pt"), TINY)
    with pytest.raises(JobError, match="does not exist"):
        load_aggregator(str(tmp_path / "nope.safetensors"), TINY)
    with pytest.raises(JobError, match="does not exist"):
        load_aggregator("memory://vggt/nope.safetensors", TINY)


def test_checkpoints_describe_their_architecture(model, tmp_path):
    """A checkpoint written by save_aggregator loads with no config given (the architecture is in its
    metadata); a .pt with a config.json beside it likewise; one that describes nothing is VGGT-1B."""
    import json

    import fsspec
    from safetensors.torch import save_file

    from janus_job.models.vggt import ARCHITECTURE_KEY, describe_checkpoint, save_aggregator

    x = frames(1, 2, 42, 56)
    with torch.no_grad():
        expected = model(x)
    save_aggregator(model, tmp_path / "tiny" / "model.safetensors")
    assert describe_checkpoint(str(tmp_path / "tiny" / "model.safetensors")) == TINY
    with torch.no_grad():
        assert torch.equal(load_aggregator(str(tmp_path / "tiny" / "model.safetensors"))(x), expected)
    with fsspec.open("memory://described/model.safetensors", "wb") as f:  # the header is read remotely too
        f.write((tmp_path / "tiny" / "model.safetensors").read_bytes())
    assert describe_checkpoint("memory://described/model.safetensors") == TINY

    (tmp_path / "pt").mkdir()
    torch.save(checkpoint_state(model), tmp_path / "pt" / "model.pt")
    assert describe_checkpoint(str(tmp_path / "pt" / "model.pt")) is None
    (tmp_path / "pt" / "config.json").write_text(json.dumps({**TINY.to_dict(), "enable_track": False}))
    with torch.no_grad():
        assert torch.equal(load_aggregator(str(tmp_path / "pt" / "model.pt"))(x), expected)

    save_file(checkpoint_state(model), tmp_path / "bare.safetensors")  # no description: read as VGGT-1B
    assert describe_checkpoint(str(tmp_path / "bare.safetensors")) is None
    with pytest.raises(JobError, match="describes no architecture, so it was read as VGGT-1B"):
        load_aggregator(str(tmp_path / "bare.safetensors"))
    save_file(checkpoint_state(model), tmp_path / "odd.safetensors", metadata={ARCHITECTURE_KEY: '{"depth": 1}'})
    with pytest.raises(JobError, match="no second-to-last layer"):
        load_aggregator(str(tmp_path / "odd.safetensors"))


# --------------------------------------------------------------------------- the GPU scripts' CPU modes


def run_bench(args: list[str], tmp_path: Path) -> str:
    proc = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_reference_check_tiny_without_reference(tmp_path):
    import json

    out = run_bench(["bench/vggt_reference_check.py", "--tiny", "--frames", "1,5"], tmp_path)
    result = json.loads((tmp_path / "vggt_reference_check_tiny.json").read_text())
    assert result["ok"] and "PASS" in out
    assert {(r["frames"], r["precision"], r["mode"]) for r in result["rows"]} == {
        (s, p, m) for s in (1, 5) for p in ("fp32", "bf16")
        for m in ("batched", "batched-mask", "streaming")}
    assert result["reference"].startswith("skipped")


REF_DIR = REPO / ".ref" / "src" / "qwen_vl" / "model"


@pytest.mark.skipif(not (REF_DIR / "vggt").is_dir(), reason="no local JanusVLN copy in .ref/")
def test_reference_check_tiny_against_local_reference(tmp_path):
    import json

    run_bench(["bench/vggt_reference_check.py", "--tiny", "--reference-dir", str(REF_DIR)], tmp_path)
    result = json.loads((tmp_path / "vggt_reference_check_tiny.json").read_text())
    assert result["ok"]
    assert result["state_dict"]["missing"] == [] and result["state_dict"]["unexpected"] == []


@pytest.mark.slow
def test_precompute_bench_tiny(tmp_path):
    import json

    out = run_bench(["bench/precompute.py", "--tiny", "--frames", "3"], tmp_path)
    result = json.loads((tmp_path / "precompute_tiny.json").read_text())
    paths = {r["path"] for r in result["rows"]}
    assert {"ours streaming", "ours batched"} <= paths
    assert all(r["samples_per_s"] > 0 for r in result["rows"])
    assert "samples/s" in out

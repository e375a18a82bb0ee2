"""janus_job.models.janusvln.lean: same values as transformers' MLP and RMSNorm, less kept for backward."""

import copy

import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from janus_job.demo.tiny import tiny_qwen_config
from janus_job.models.janusvln.build import model_from_config
from janus_job.models.janusvln.lean import make_activation_lean

DTYPES = [torch.float32, torch.bfloat16]


def text_config():
    return tiny_qwen_config().text_config


def run(module, x):
    """Output, input gradient and parameter gradients of sum(out^2)."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.float().square().sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def saved_bytes(fn):
    """Bytes of distinct tensors autograd keeps for backward while `fn` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lean_mlp_is_bit_identical(dtype):
    torch.manual_seed(0)
    stock = qwen.Qwen2MLP(text_config()).to(dtype)
    lean = copy.deepcopy(stock)
    assert make_activation_lean(lean) == 1
    x = torch.randn(3, 17, stock.hidden_size, dtype=dtype)
    out0, gx0, gp0 = run(stock, x)
    out1, gx1, gp1 = run(lean, x)
    assert torch.equal(out0, out1)
    assert torch.equal(gx0, gx1)
    assert gp0.keys() == gp1.keys() and all(torch.equal(gp0[n], gp1[n]) for n in gp0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lean_rms_norm_matches(dtype):
    torch.manual_seed(0)
    stock = qwen.Qwen2_5_VLRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        stock.weight.normal_(1.0, 0.2)
    lean = copy.deepcopy(stock)
    assert make_activation_lean(lean) == 1
    x = torch.randn(3, 17, 64, dtype=dtype) * 3
    out0, gx0, gp0 = run(stock, x)
    out1, gx1, gp1 = run(lean, x)
    assert torch.equal(out0, out1)  # the same fp32 ops in the same order
    # backward: the same formula, accumulated in another order (fp32) / rounded once instead of per op (bf16)
    bound = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(gx1, gx0) < bound
    assert rel(gp1["weight"], gp0["weight"]) < bound


def test_lean_layers_keep_less_for_backward():
    """One decoder layer: the lean MLP drops one intermediate-size tensor, each norm its fp32 copy."""
    cfg = text_config()
    torch.manual_seed(0)
    stock = qwen.Qwen2_5_VLDecoderLayer(cfg, layer_idx=0).to(torch.bfloat16)
    lean = copy.deepcopy(stock)
    assert make_activation_lean(lean) == 3  # mlp + 2 norms
    tokens = 64
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    rotary = qwen.Qwen2_5_VLRotaryEmbedding(cfg)
    position_ids = torch.arange(tokens).view(1, 1, -1).expand(3, 1, -1)
    position_embeddings = rotary(x, position_ids)
    kept = {}
    for name, layer in (("stock", stock), ("lean", lean)):
        kept[name] = saved_bytes(lambda: layer(x, position_embeddings=position_embeddings))
    saving = kept["stock"] - kept["lean"]
    per_token = tokens * 2  # bytes of one bf16 value per token
    expected = per_token * (cfg.intermediate_size + 2 * 2 * cfg.hidden_size)  # 1 x I + 2 norms x 4H bytes
    assert saving >= 0.95 * expected, (kept, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lean_janus_model_equals_stock(dtype):
    """The whole language model switched over: same loss, gradients within rounding."""
    torch.manual_seed(0)
    cfg = tiny_qwen_config()
    stock = model_from_config(cfg, None, dtype=dtype, lean_activations=False)
    lean = copy.deepcopy(stock)
    layers = cfg.text_config.num_hidden_layers
    assert make_activation_lean(lean.model.language_model) == 3 * layers + 1  # + the final norm
    built = model_from_config(cfg, None, dtype=dtype)  # the default switches the language model only
    assert sum(m.forward.__func__.__module__ == "janus_job.models.janusvln.lean" for m in built.modules()
               if "forward" in m.__dict__) == 3 * layers + 1
    ids = torch.randint(20, 200, (2, 24))
    labels = ids.clone()
    labels[:, :16] = -100
    results = []
    for model in (stock, lean):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, g0), (loss1, g1) = results
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys()
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    worst = max(rel(g1[n], g0[n]) for n in g0 if g0[n].float().norm() > 0)
    assert worst < bound, worst


def test_unknown_layers_are_refused_not_silently_left_stock():
    """The memory estimate assumes the lean layers: a model where they cannot all be switched
    (here a non-SiLU MLP) is refused when it is built."""
    from janus_job.errors import JobError

    cfg = tiny_qwen_config()
    cfg.text_config.hidden_act = "gelu"
    with pytest.raises(JobError, match="switched 5 of the language model's 7"):
        model_from_config(cfg, None)
    assert model_from_config(cfg, None, lean_activations=False) is not None

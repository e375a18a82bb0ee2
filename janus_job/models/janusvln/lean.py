"""Activation-lean SwiGLU and RMSNorm for the language model's decoder layers.

Autograd keeps, per decoder layer and token, four intermediate-size tensors for the MLP (the
SiLU input and output, the up projection, their product) and an fp32 copy of every RMSNorm
input. The functions here compute the same values with the same kernels but keep only what
backward cannot recompute in one elementwise pass: the MLP's gate and up projections (the
product is still kept by `down_proj`) and each norm's input in its own dtype plus one fp32 scale
per token. On Qwen2.5-VL-7B at 3,777 tokens that is ~3.7 GiB (MLP) + ~2.9 GiB (norms) less per
sample; `make_activation_lean` switches a model's language model over.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up; backward recomputes silu(gate) and runs the ops autograd would run."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)) computed in fp32 like the transformers module; keeps x and 1/rms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.to(torch.float32)
        normed = x32 * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).sum_to_size(weight.shape)
        grad_normed = (grad * weight).to(torch.float32)
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def lean_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)


def lean_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


SILU_MODULES = ("SiLU", "SiLUActivation")  # torch's and transformers' (ACT2FN["silu"])


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(lean_swiglu(self.gate_proj(x), self.up_proj(x)))


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return lean_rms_norm(hidden_states, self.weight, self.variance_epsilon)


def make_activation_lean(language_model: nn.Module) -> int:
    """Route the SwiGLU MLPs and RMSNorms under `language_model` through the lean functions.

    Returns how many modules were switched. Only modules whose structure is known are touched:
    an MLP with gate/up/down projections and a SiLU activation, a norm with `weight` and
    `variance_epsilon`.
    """
    switched = 0
    for module in language_model.modules():
        is_swiglu = (all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
                     and type(getattr(module, "act_fn", None)).__name__ in SILU_MODULES)
        is_rms_norm = (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
                       and isinstance(getattr(module, "weight", None), nn.Parameter))
        if is_swiglu:
            module.forward = types.MethodType(_mlp_forward, module)
        elif is_rms_norm:
            module.forward = types.MethodType(_norm_forward, module)
        else:
            continue
        switched += 1
    return switched

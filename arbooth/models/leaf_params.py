"""Small leaf modules that own the raw parameters of VAR and Infinity, with their Opacus grad samplers.

The official code keeps these tensors as loose `nn.Parameter`s on composite modules (an attention layer,
a block). Opacus computes per-sample gradients per leaf module from the module's inputs (activations)
and the gradient of its output (backprops), so a raw parameter on a composite module has no per-sample
gradient without patching Opacus. Here each one lives in a leaf whose sampler is registered with
`opacus.grad_sample.register_grad_sampler` (Opacus' extension point), so DP fine-tuning of either model
family needs no patches (issue 12). Parameter names keep the official leaf names (`scale_mul_1H11`,
`gss` for `ada_gss`), so the no-weight-decay rules that match on names still apply.

Each output is `input (op) parameter` with the parameter broadcast over the batch and positions, so a
per-sample gradient is the backprop (times the local derivative) summed over the broadcast dims.
"""
from __future__ import annotations

import math

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

MAX_SCALE_MUL = math.log(100)  # official clamp of the per-head attention temperature (basic_var.py, basic.py)


class HeadScale(nn.Module):
    """Learnable per-head temperature of l2-normalised (cosine) attention: q * exp(min(s_h, log 100)).

    `scale_mul_1H11` (1, H, 1, 1) in log space, initialised at log 4 (both releases). Input/output
    q (B, H, L, c). `cast_to_input=True` returns q's dtype (VAR's path); False lets torch promote a bf16
    q to fp32, as Infinity's basic.py does (its RoPE then runs in fp32).
    """

    def __init__(self, H: int, cast_to_input: bool = True):
        super().__init__()
        self.cast_to_input = cast_to_input
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())

    def forward(self, q_BHLc: torch.Tensor) -> torch.Tensor:
        scale = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        return q_BHLc * scale.to(q_BHLc.dtype) if self.cast_to_input else q_BHLc.mul(scale)


class AdaGSS(nn.Module):
    """Per-block offset `gss` (1, 1, 6, C) added to the shared AdaLN modulation (B, 1, 6, C): the
    official `ada_gss` of a shared-AdaLN block (VAR shared_aln=True; every Infinity block)."""

    def __init__(self, C: int):
        super().__init__()
        self.gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)

    def forward(self, cond_B16C: torch.Tensor) -> torch.Tensor:
        return self.gss + cond_B16C


@register_grad_sampler(HeadScale)
def _head_scale_grad_sample(layer: HeadScale, activations, backprops: torch.Tensor) -> dict:
    s = layer.scale_mul_1H11
    if not s.requires_grad:
        return {}
    g_BH = (backprops.float() * activations[0].float()).sum(dim=(2, 3))  # d out / d s = q * exp(s) where not clamped
    return {s: (g_BH.view(-1, *s.shape) * s.exp() * (s <= MAX_SCALE_MUL)).to(s.dtype)}


@register_grad_sampler(AdaGSS)
def _ada_gss_grad_sample(layer: AdaGSS, activations, backprops: torch.Tensor) -> dict:
    return {layer.gss: backprops.reshape(-1, *layer.gss.shape)} if layer.gss.requires_grad else {}

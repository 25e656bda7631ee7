"""AdamW for parameters kept in bfloat16, with stochastic rounding.

ARBooth tunes Infinity-2B's blocks in bf16 (the authors' setting, and what fits 24 GB). With plain
AdamW on bf16 weights, an update smaller than half a bf16 ulp (2^-8 relative) rounds away: at the
recipe's lr of 2.3e-5 most updates are lost. Here the update is computed in fp32 and the new value is
rounded to bf16 stochastically (up with probability equal to the remainder), so every update survives
in expectation (Gupta et al. 2015, "Deep learning with limited numerical precision"; Zamirai et al.
2020, "Revisiting BFloat16 training"). Moments are stored in the parameter's dtype, as
`torch.optim.AdamW` does, so memory is unchanged; fp32 parameters get exactly torch's AdamW update.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 `x` to bf16, up with probability equal to the dropped fraction: E[result] = x."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    # bf16 is the upper half of an fp32: adding uniform noise to the lower half and truncating rounds the
    # magnitude up with probability (lower half) / 2^16 (sign-magnitude, so this is unbiased for negatives)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction), computed in fp32; bf16
    parameters are written back with stochastic rounding, others exactly."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, generator: torch.Generator | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.generator = generator

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                p32 = p.float().mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                p32.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                for dst, src in ((p, p32), (state["exp_avg"], m), (state["exp_avg_sq"], v)):
                    dst.copy_(stochastic_round_to_bf16(src, self.generator) if dst.dtype == torch.bfloat16 else src)
        return loss

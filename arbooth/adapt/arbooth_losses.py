"""ARBooth losses: scale-weighted bitwise cross-entropy and prior distillation.

Shapes: B batch, L tokens over all scales (sum of h*w), d bits per token, V = 2d logits per token
laid out in pairs `[..., 2i:2i+2]` = (logit of bit i = 0, logit of bit i = 1).

Both losses reduce like the authors' trainer (jiwoogit/ARBooth booth_trainer_final.py L193-213 and
L258-276): a per-token loss, multiplied by 1/L (not renormalised by the weights), summed over tokens,
averaged over the batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Schedule = Sequence[tuple[int, int, int]]  # (t, h, w) per scale


def default_scale_weights(num_scales: int, first: int = 8, near: float = 1.0, far: float = 0.5) -> tuple[float, ...]:
    """The authors' weights: 1.0 for the first 8 scales, 0.5 after (booth_trainer_final.py L205-213)."""
    return tuple(near if i < first else far for i in range(num_scales))


def scale_lengths(schedule: Schedule) -> list[int]:
    return [t * h * w for t, h, w in schedule]


def token_weights(schedule: Schedule, scale_weights: Sequence[float]) -> torch.Tensor:
    """(L,) weight of every token: its scale's weight."""
    lengths = scale_lengths(schedule)
    if len(scale_weights) != len(lengths):
        raise ValueError(f"{len(scale_weights)} scale weights for a schedule of {len(lengths)} scales")
    return torch.cat([torch.full((n,), float(w)) for n, w in zip(lengths, scale_weights)])


def bitwise_ce_per_token(logits_BLV: torch.Tensor, bits_BLd: torch.Tensor) -> torch.Tensor:
    """(B, L): 2-way cross-entropy of every bit, averaged over the d bits (bitloss_type='mean')."""
    B, L, V = logits_BLV.shape
    logits_BLd2 = logits_BLV.float().reshape(B, L, V // 2, 2)
    ce_BLd = F.cross_entropy(logits_BLd2.permute(0, 3, 1, 2), bits_BLd.long(), reduction="none")
    return ce_BLd.mean(dim=-1)


def reduce_per_token(loss_BL: torch.Tensor) -> torch.Tensor:
    """The authors' reduction: * 1/L, sum over tokens, mean over the batch."""
    return loss_BL.mul(1.0 / loss_BL.shape[1]).sum(dim=-1).mean()


def scale_weighted_bitwise_ce(logits_BLV: torch.Tensor, bits_BLd: torch.Tensor, schedule: Schedule,
                              scale_weights: Sequence[float]) -> torch.Tensor:
    """The instance loss: bitwise CE with one weight per scale."""
    w_L = token_weights(schedule, scale_weights).to(logits_BLV.device)
    return reduce_per_token(bitwise_ce_per_token(logits_BLV, bits_BLd) * w_L)


def distill_per_token(student_BLV: torch.Tensor, teacher_BLV: torch.Tensor, *,
                      kind: Literal["soft", "hard"] = "soft", temperature: float = 1.0,
                      softmax_over: Literal["token", "bit"] = "token") -> torch.Tensor:
    """(B, L) prior-distillation loss of every token.

    soft, softmax_over="token": KL(teacher || student) with one softmax over all 2d logits of a token,
    as the authors do (booth_trainer_final.py L258-262). That treats the 2d logits as one 2d-way
    categorical, which is not the model's distribution (d independent 2-way bits).
    soft, softmax_over="bit": KL of every bit's 2-way distribution, summed over bits: the KL between
    the model's actual factorised token distributions.
    hard: bitwise CE against the teacher's most likely bits, averaged over bits (L264-273).
    """
    B, L, V = student_BLV.shape
    s = student_BLV.float()
    t = teacher_BLV.float().detach()
    if kind == "hard":
        return bitwise_ce_per_token(s, t.reshape(B, L, V // 2, 2).argmax(dim=-1))
    if kind != "soft":
        raise ValueError(f"unknown distillation kind {kind!r}")
    if softmax_over == "bit":
        s, t = s.reshape(B, L, V // 2, 2), t.reshape(B, L, V // 2, 2)
    elif softmax_over != "token":
        raise ValueError(f"softmax_over must be 'token' or 'bit', got {softmax_over!r}")
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1), reduction="none")
    return kl.reshape(B, L, -1).sum(dim=-1)


def distill_loss(student_BLV: torch.Tensor, teacher_BLV: torch.Tensor, **kwargs) -> torch.Tensor:
    """Prior-distillation loss, reduced like the instance loss (no scale weights, as the authors)."""
    return reduce_per_token(distill_per_token(student_BLV, teacher_BLV, **kwargs))


@torch.no_grad()
def per_scale_bit_accuracy(logits_BLV: torch.Tensor, bits_BLd: torch.Tensor, schedule: Schedule) -> list[float]:
    """Fraction of bits predicted right (argmax) at every scale."""
    B, L, V = logits_BLV.shape
    correct_BL = (logits_BLV.reshape(B, L, V // 2, 2).argmax(-1) == bits_BLd.long()).float().mean(-1)
    return [c.mean().item() for c in correct_BL.split(scale_lengths(schedule), dim=1)]

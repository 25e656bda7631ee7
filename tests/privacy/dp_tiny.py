"""Tiny models and a brute-force reference for the privacy tests (imported by tests in this folder)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

VOCAB, T, D, CLASSES = 11, 3, 8, 5


class PosBias(nn.Module):
    """A learned per-position bias with its own grad sampler: not foldable, so views are summed."""

    def __init__(self, t: int, d: int) -> None:
        super().__init__()
        self.bias_TD = nn.Parameter(torch.randn(t, d) * 0.1)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        return x_NTD + self.bias_TD


@register_grad_sampler(PosBias)
def _pos_bias_grad_sample(layer: PosBias, activations: list, backprops: torch.Tensor) -> dict:
    return {layer.bias_TD: backprops} if layer.bias_TD.requires_grad else {}


class TinyNet(nn.Module):
    """Embedding -> per-position bias -> Linear -> LayerNorm -> GELU -> Linear; logits per position."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, D)
        self.pos = PosBias(T, D)
        self.fc1 = nn.Linear(D, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, CLASSES)

    def forward(self, tok_NT: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(self.pos(self.emb(tok_NT))))))


def make_views(tok_BT: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """K "augmented" views per example, contiguous: (B, T) -> (B*K, T); view 0 is the original."""
    g = torch.Generator().manual_seed(seed)
    rep = tok_BT.repeat_interleave(k, 0)
    shift = torch.randint(0, 3, rep.shape, generator=g)
    shift[::k] = 0
    return (rep + shift) % VOCAB


def row_loss(logits_NTC: torch.Tensor, y_NT: torch.Tensor) -> torch.Tensor:
    """Per-row loss (N,): mean token cross-entropy."""
    return F.cross_entropy(logits_NTC.transpose(1, 2), y_NT, reduction="none").mean(1)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def brute_force_grads(model: nn.Module, tok_NT: torch.Tensor, y_NT: torch.Tensor, k: int
                      ) -> list[torch.Tensor]:
    """One example at a time: flat gradient of the mean over its k views' losses, (B, P)."""
    out = []
    for i in range(tok_NT.shape[0] // k):
        sl = slice(i * k, (i + 1) * k)
        loss = row_loss(model(tok_NT[sl]), y_NT[sl]).mean()
        grads = torch.autograd.grad(loss, trainable(model))
        out.append(torch.cat([g.flatten() for g in grads]))
    return out


def clip(g: torch.Tensor, c: float) -> torch.Tensor:
    return g * min(1.0, c / (g.norm().item() + 1e-6))

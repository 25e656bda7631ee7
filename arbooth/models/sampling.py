"""Token and bit sampling shared by the autoregressive samplers (VAR's tokens, Infinity's bits, the ARBooth
teacher): top-k / top-p filtering, seeded multinomial sampling and a seeded gumbel softmax. Every random draw takes an explicit
`torch.Generator`, so the same seed gives the same tokens.

Shapes: B batch, l tokens of the current scale, V vocabulary size.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from arbooth.errors import ConfigError


def top_k_top_p_filter(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (a new tensor).

    Matches FoundationVision/VAR models/helpers.py `sample_with_top_k_top_p_`: the top-k threshold is
    the k-th largest logit (ties kept); the nucleus drops the smallest tokens whose cumulative
    probability stays <= 1 - top_p, and always keeps the most likely token."""
    V = logits_BlV.shape[-1]
    if top_k > 0:
        kth_Bl1 = logits_BlV.topk(min(top_k, V), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_Bl1, -torch.inf)
    if top_p > 0:
        sorted_BlV, sorted_idx_BlV = logits_BlV.sort(dim=-1, descending=False)
        remove_sorted_BlV = sorted_BlV.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted_BlV[..., -1:] = False
        remove_BlV = remove_sorted_BlV.scatter(-1, sorted_idx_BlV, remove_sorted_BlV)
        logits_BlV = logits_BlV.masked_fill(remove_BlV, -torch.inf)
    return logits_BlV


def sample_top_k_top_p(
    logits_BlV: torch.Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per position from softmax(filtered logits): (B, l, V) -> (B, l) LongTensor."""
    B, l, V = logits_BlV.shape
    probs_NV = top_k_top_p_filter(logits_BlV.float(), top_k, top_p).softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs_NV, num_samples=1, replacement=True, generator=generator).view(B, l)


def gumbel_softmax(
    logits: torch.Tensor,
    tau: float = 1.0,
    hard: bool = False,
    dim: int = -1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`F.gumbel_softmax` with a seeded generator (FoundationVision/VAR models/helpers.py
    `gumbel_softmax_with_rng`): softmax((logits + g) / tau) with g = -log(Exp(1))."""
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    y_soft = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.argmax(dim, keepdim=True)
    y_hard = torch.zeros_like(logits).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def sample_bits(logits_BlV: torch.Tensor, top_k: int, top_p: float,
                generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Infinity's bit sampler: logits (B, l, V) -> one index in [0, V) per row, (B, l) long; for bits V = 2
    (a (bit 0, bit 1) pair per bit). Top-k / top-p filtering and one multinomial draw per row, as
    FoundationVision/Infinity infinity/utils `sample_with_top_k_top_p_also_inplace_modifying_logits_`
    (same filtering order and RNG calls, so its seeds give its bits; VAR's filter above differs in
    tie handling and is kept separate). A list of
    generators, one per batch row, draws each row from its own (per-image seeds in a batch)."""
    B, l, V = logits_BlV.shape
    logits = logits_BlV.float().clone()
    if 0 < top_k < V:
        logits.masked_fill_(logits < logits.topk(top_k, dim=-1)[0].amin(-1, keepdim=True), -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(-1).cumsum_(-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), -torch.inf)
    probs_BlV = logits.softmax(-1)
    if isinstance(generator, torch.Generator) or generator is None:
        return torch.multinomial(probs_BlV.view(-1, V), 1, replacement=True, generator=generator).view(B, l)
    if len(generator) != B:
        raise ConfigError(f"{len(generator)} generators for a batch of {B}")
    return torch.stack([torch.multinomial(p_lV, 1, replacement=True, generator=g).view(l)
                        for p_lV, g in zip(probs_BlV, generator, strict=True)])

"""Token sampling helpers shared by the autoregressive samplers (VAR, Infinity): range checks of the
sampling arguments, per-image generators, top-k / top-p filtering, seeded multinomial sampling and a
seeded gumbel softmax. Every random draw takes an explicit `torch.Generator` (or one per batch row),
so the same seed gives the same tokens, and with one seed per image an image depends only on its own
seed, not on the batch it was sampled in.

Shapes: B batch, l tokens of the current scale, V vocabulary size.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from arbooth.errors import ConfigError

Generators = torch.Generator | Sequence[torch.Generator] | None

# The default classifier-free guidance scale of each family, the release's own; both samplers call the
# scale `cfg`, as the releases do. The two read a scale differently (README, "Guidance scales mean ..."):
#   VAR (class-conditional, FoundationVision/VAR var.py autoregressive_infer_cfg): logits
#     (1 + t*s) * cond - t*s * uncond, ramped over scales t in [0, 1]: 0 = no guidance (conditional only);
#   Infinity (text, tools/run_infinity.py): s * cond + (1 - s) * uncond: 1 = no guidance, 0 = unconditional.
# VAR's default (1.5) is `var_presets.VAR_GUIDANCE`, torch-free so that `arbooth sample --help` stays light.
INFINITY_GUIDANCE = 4.0  # subject side: Infinity.generate, the subject presets (generate, eval-subject, val grids)


def check_sampling_args(*, top_k: int | None = None, top_p: float | None = None,
                        cfg: float | Sequence[float] | None = None,
                        tau: float | Sequence[float] | None = None, where: str = "") -> None:
    """Raise ConfigError (one line) for an out-of-range sampling argument; None skips a check.

    top_k: an integer >= 0 (0 = no top-k filter, as the official samplers); top_p in [0, 1] (0 = no
    nucleus filter); cfg (a guidance scale, or one per scale) finite and >= 0 (VAR: 0 = no guidance;
    Infinity: 1 = no guidance, 0 = unconditional); tau (temperature, or one per scale) finite and > 0.
    Outside these ranges the official code silently samples unfiltered or divides by zero."""
    pre = f"{where}: " if where else ""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ConfigError(f"{pre}top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 <= top_p <= 1.0):
        raise ConfigError(f"{pre}top_p must be in [0, 1] (0 = off), got {top_p!r}")
    for name, value, ok, rule in (("cfg", cfg, lambda v: v >= 0, ">= 0"), ("tau", tau, lambda v: v > 0, "> 0")):
        if value is None:
            continue
        values = [value] if isinstance(value, (int, float)) else list(value)
        bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and ok(v))]
        if bad or not values:
            raise ConfigError(f"{pre}{name} must be a finite number {rule} (or one per scale), got {value!r}")


def seed_generators(seed: int | Sequence[int] | torch.Generator | Sequence[torch.Generator] | None, batch: int,
                    device: torch.device | str) -> Generators:
    """One generator for the batch (an int seed), one per image (a list of B seeds or generators), a
    given generator unchanged, or None (the global RNG). ConfigError when a list is not B long."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, int):
        return torch.Generator(device).manual_seed(seed)
    seeds = list(seed)
    if len(seeds) != batch:
        raise ConfigError(f"{len(seeds)} seeds for {batch} prompts" if batch else f"{len(seeds)} seeds for 0 images")
    return [s if isinstance(s, torch.Generator) else torch.Generator(device).manual_seed(int(s)) for s in seeds]


def multinomial_rows(probs_BlV: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One draw per position from probabilities (B, l, V) -> (B, l). With a list of B generators, row b
    draws from generator b only (the same draws as sampling that image alone)."""
    B, l, V = probs_BlV.shape
    if isinstance(generator, torch.Generator) or generator is None:
        return torch.multinomial(probs_BlV.reshape(-1, V), 1, replacement=True, generator=generator).view(B, l)
    if len(generator) != B:
        raise ConfigError(f"{len(generator)} generators for a batch of {B}")
    return torch.stack([torch.multinomial(p_lV, 1, replacement=True, generator=g).view(l)
                        for p_lV, g in zip(probs_BlV, generator, strict=True)])


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
    generator: Generators = None,
) -> torch.Tensor:
    """Draw one token per position from softmax(filtered logits): (B, l, V) -> (B, l) LongTensor.
    `generator` may be one per batch row (see `multinomial_rows`)."""
    return multinomial_rows(top_k_top_p_filter(logits_BlV.float(), top_k, top_p).softmax(dim=-1), generator)


def gumbel_softmax(
    logits: torch.Tensor,
    tau: float = 1.0,
    hard: bool = False,
    dim: int = -1,
    generator: Generators = None,
) -> torch.Tensor:
    """`F.gumbel_softmax` with a seeded generator (FoundationVision/VAR models/helpers.py
    `gumbel_softmax_with_rng`): softmax((logits + g) / tau) with g = -log(Exp(1)). With a list of
    generators, row b of `logits` (batch first) draws its noise from generator b."""
    if isinstance(generator, torch.Generator) or generator is None:
        gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    else:
        gumbels = torch.stack([-torch.empty_like(row).exponential_(generator=g).log()
                               for row, g in zip(logits, generator, strict=True)])
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
    V = logits_BlV.shape[-1]
    logits = logits_BlV.float().clone()
    if 0 < top_k < V:
        logits.masked_fill_(logits < logits.topk(top_k, dim=-1)[0].amin(-1, keepdim=True), -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(-1).cumsum_(-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), -torch.inf)
    return multinomial_rows(logits.softmax(-1), generator)

"""Infinity's bitwise self-correction (BSC): noisy teacher-forcing inputs with re-quantised labels.

Same math as the released `BitwiseSelfCorrection.flip_requant` (FoundationVision/Infinity
infinity/models/bitwise_self_correction.py L32-84; the ARBooth fork's copy is identical, and
booth_trainer_final.py L177 trains with it: `noise_apply_layers=13`, `noise_apply_strength=0.3`,
`noise_apply_requant=1`, arg_util.py L184-186). Walking the scales from coarse to fine:

1. residual_k = features - cum_k, area-down-sampled to scale k (not at the last scale), where cum_k is
   the sum of the codes *fed to the model* for scales < k, each trilinearly up-sampled to the last
   scale;
2. label_k = BSQ bits of residual_k (never flipped);
3. for k < apply_layers: rate_k is drawn uniformly from {0, 0.01, ..., strength} (one rate per scale,
   shared by the whole batch) and every bit of label_k is flipped independently with probability
   rate_k, giving input_k; otherwise input_k = label_k;
4. the codes fed for scale k are the codes of input_k with `requant`, else those of label_k;
5. teacher-forcing input of scale k+1 = cum_{k+1} trilinearly resampled to scale k+1.

So the labels are "clean" only in that they are never flipped: with requant, label_k (k >= 1) is the
quantisation of what the features still lack after the *flipped* coarser scales, i.e. the bits that
correct the earlier mistakes, and generally differs from the clean `encode_bits` label. label_0 is
always the clean one. Without requant the flips never reach the output (the release only uses them
for a debug picture), so here nothing is drawn: inputs and labels are the clean ones, rates all 0.

Invariants (tested): `x_BLd == vae.bits_to_var_input(input_bits)`, and label_k == BSQ bits of
features - sum_{j<k} up(codes(input_j)) down-sampled to scale k.

Differences from the release: the fed codes always come from bits (`vae.bits_to_codes`, as official
`indices_to_codes`), also for unflipped scales, where the release without requant (or beyond
`apply_layers`) keeps the quantiser's straight-through value z + (zhat - z), equal to zhat up to
float rounding. The flip-rate index is drawn with `round(100 * strength)` as the upper bound, where
the release's `np.random.randint(0, 100 * s + 1)` truncates (same for 0.3; 0.29 would stop at 0.28
there). Randomness comes only from `generator` (the release uses numpy's and torch's global RNGs).
The residual here is features - (sum of codes), as in the release, while `BSQVAE.quantize`
subtracts scale by scale; the two agree bit for bit in the tests (1M schedule, 32 bits), and could
differ only where a residual component is within float rounding of 0.

With spatial patchify (Infinity-8B's tokenizer, `vae.spatial_patchify`) the walk runs on the latent grid
(`vae.latent_schedule`, 2h x 2w per scale) and flips latent bits, as the release; the inputs and the
returned bits are then patchified to k = 4d bits per token (flip_requant L62-75, `pixel_unshuffle`).

Shape letters: B batch, d bits per token (k = `vae.token_dim` with spatial patchify), H/W last-scale map,
h/w one scale's map, L tokens of the whole schedule (x_BLd holds the L - 1 tokens after the first scale).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from arbooth.errors import ConfigError
from arbooth.models.bsq_vae import BSQVAE, Schedule


class BSCResult(NamedTuple):
    x_BLd: torch.Tensor               # teacher-forcing input (B, L - h0*w0, k), float32
    label_bits: list[torch.Tensor]    # per scale (B, h, w, k) uint8: the targets (re-quantised, never flipped)
    input_bits: list[torch.Tensor]    # per scale (B, h, w, k) uint8: the (flipped) bits the input is built from
    rates: tuple[float, ...]          # flip rate drawn per scale (0.0 where no noise is applied)


def _draw_rate(strength: float, generator: torch.Generator) -> float:
    steps = round(100 * strength)  # rates 0, 0.01, ..., strength (bitwise_self_correction.py L52)
    return int(torch.randint(0, steps + 1, (), generator=generator, device=generator.device)) * 0.01


@torch.no_grad()
def flip_requant(vae: BSQVAE, features_BdHW: torch.Tensor, schedule: Schedule, *, strength: float = 0.3,
                 apply_layers: int = 13, requant: bool = True,
                 generator: torch.Generator | None = None) -> BSCResult:
    """Bitwise self-correction of one batch of raw VAE features (`vae.encode_features(img)`).

    strength: largest per-scale flip rate (a multiple of 0.01 in [0, 1]); apply_layers: the first
    `apply_layers` scales get flips (the authors' 13 = all of the 1M schedule); requant: rebuild the
    following inputs and labels from the flipped codes (without it the flips have no effect, as in the
    release). With strength 0 the result equals the clean path exactly: `vae.encode_bits` labels and
    `vae.bits_to_var_input` of them. See the module docstring for the exact procedure.
    """
    if features_BdHW.ndim != 4 or features_BdHW.shape[1] != vae.codebook_dim:
        raise ConfigError(f"expected raw features (B, {vae.codebook_dim}, H, W), got {tuple(features_BdHW.shape)}")
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"BSC strength must be in [0, 1], got {strength}")
    schedule = vae.latent_schedule(schedule)  # the walk runs on the latent grid (2h x 2w with patchify)
    f = features_BdHW.unsqueeze(2).float()  # B d 1 H W
    full = tuple(f.shape[2:])
    if schedule[-1] != full:
        raise ConfigError(f"last scale {schedule[-1]} does not match the feature map {full}")
    noisy = requant and strength > 0 and apply_layers > 0  # without requant the flips reach nothing
    if noisy and generator is None:
        raise ConfigError("flip_requant needs a torch.Generator when strength > 0 (no global RNG)")
    cum, labels, inputs, rates, x = 0.0, [], [], [], []
    for si, pn in enumerate(schedule):
        residual = f - cum
        if si != len(schedule) - 1:
            residual = F.interpolate(residual, size=pn, mode=vae.down_mode).contiguous()
        _, label = vae._quantize(residual)  # B h w d, the BSQ bits (sign of the l2-normalised residual)
        rate = _draw_rate(strength, generator) if noisy and si < apply_layers else 0.0
        if rate > 0:
            flip = torch.rand(label.shape, generator=generator, device=generator.device) < rate
            fed = label ^ flip.to(label.device, torch.uint8)
        else:
            fed = label
        labels.append(vae.bits_to_tokens(label))
        inputs.append(vae.bits_to_tokens(fed))
        rates.append(rate)
        # Same ops and order as BSQVAE.bits_to_var_input, so that strength 0 matches it bit for bit.
        codes = vae.bits_to_codes(inputs[-1])
        cum = cum + F.interpolate(codes, size=full, mode=vae.up_mode).contiguous()
        if si != len(schedule) - 1:
            nxt = F.interpolate(cum, size=schedule[si + 1], mode=vae.up_mode).contiguous()
            x.append(vae.codes_to_tokens(nxt))  # B d 1 H W -> B (h w) k
    return BSCResult(torch.cat(x, 1), labels, inputs, tuple(rates))

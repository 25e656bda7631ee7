"""Bitwise self-correction (official flip_requant): clean at strength 0, flip-rate statistics, the
re-quantisation recursion checked by hand, seeding, and one ARBooth recipe step with it on."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arbooth.config import load_config
from arbooth.errors import ConfigError
from arbooth.models.bitwise_self_correction import flip_requant
from arbooth.models.bsq_vae import BSQVAE
from arbooth.models.infinity_schedule import infinity_scale_schedule
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_subject import instance_batch, setup, train_step
from arbooth.toy.tiny import TINY

SCHED_S = [tuple(s) for s in infinity_scale_schedule(1.0, "0.06M")]  # 7 scales, last 16x16
SCHED_1M = [tuple(s) for s in infinity_scale_schedule(1.0, "1M")]    # 13 scales, last 64x64


@pytest.fixture(scope="module")
def vae() -> BSQVAE:
    torch.manual_seed(0)
    return BSQVAE(**TINY["vae"]).eval().requires_grad_(False)  # d = 8


def features(d: int, hw: int, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, d, hw, hw, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_strength_zero_is_the_clean_path(vae: BSQVAE) -> None:
    img = torch.rand(2, 3, 256, 256, generator=gen(1)) * 2 - 1
    with torch.no_grad():
        bits = vae.encode_bits(img, SCHED_S)
        x_clean = vae.bits_to_var_input(bits, SCHED_S)
        f = vae.encode_features(img)
    for kw in ({"strength": 0.0}, {"strength": 0.3, "requant": False}, {"strength": 0.3, "apply_layers": 0}):
        r = flip_requant(vae, f, SCHED_S, generator=gen(), **kw)
        assert torch.equal(r.x_BLd, x_clean), kw
        assert all(torch.equal(a, b) for a, b in zip(r.label_bits, bits)), kw
        assert all(torch.equal(a, b) for a, b in zip(r.input_bits, bits)) and r.rates == (0.0,) * 7, kw
    # the full 1M schedule with 32 bits (the released VAE's d), random features: still bit for bit
    big = BSQVAE(codebook_dim=32, base_ch=32, num_res_blocks=1, ch_mult=(1,), patch_size=1)
    f = features(32, 64, B=1) * 3
    _, bits, _ = big.quantize(f, SCHED_1M)
    r = flip_requant(big, f, SCHED_1M, strength=0.0)
    assert all(torch.equal(a, b) for a, b in zip(r.label_bits, bits))
    assert torch.equal(r.x_BLd, big.bits_to_var_input(bits, SCHED_1M))
    assert r.x_BLd.shape == (1, sum(h * w for _, h, w in SCHED_1M) - 1, 32)


def test_flip_rates_follow_the_official_distribution(vae: BSQVAE) -> None:
    f, g = features(8, 16), gen(3)
    grid = {round(0.01 * k, 2) for k in range(31)}
    rates, flipped, total = [], torch.zeros(7), torch.zeros(7)
    for _ in range(300):
        r = flip_requant(vae, f, SCHED_S, strength=0.3, apply_layers=13, requant=True, generator=g)
        rates.append(r.rates)
        for si, (inp, lab) in enumerate(zip(r.input_bits, r.label_bits)):
            mask = inp ^ lab  # input = label with the flipped bits inverted
            flipped[si] += mask.sum()
            total[si] += mask.numel()
            if si == 6:  # 2*16*16*8 = 4096 bits: the per-draw fraction is the drawn rate (one rate per scale)
                assert abs(mask.float().mean().item() - r.rates[si]) < 0.04
    R = torch.tensor(rates)  # draws x scales
    assert {round(v, 2) for v in R.flatten().tolist()} <= grid and R.min() == 0 and R.max() == pytest.approx(0.3)
    assert torch.allclose(R.mean(0), torch.full((7,), 0.15), atol=0.02)  # uniform on 0..0.30: mean 0.15
    # pooled fraction of flipped input bits at the big scales = the mean drawn rate
    frac = flipped / total
    assert torch.allclose(frac[4:], R.mean(0)[4:], atol=0.01)
    # apply_layers=3: only the first 3 scales get flips
    r = flip_requant(vae, f, SCHED_S, strength=0.3, apply_layers=3, generator=gen(4))
    assert r.rates[3:] == (0.0,) * 4 and any(r.rates[:3])
    assert all(torch.equal(a, b) for a, b in zip(r.input_bits[3:], r.label_bits[3:]))


def test_requant_recursion_by_hand(vae: BSQVAE) -> None:
    """label_k = bits of (features - sum_{j<k} up(codes(input_j))) area-down-sampled to scale k, and the
    input is the running sum of the fed (flipped) codes: the official invariant of flip_requant."""
    f = features(8, 16, seed=5)
    r = flip_requant(vae, f, SCHED_S, strength=0.3, generator=gen(6))
    assert sum(r.rates) > 0
    assert torch.equal(r.x_BLd, vae.bits_to_var_input(r.input_bits, SCHED_S))
    _, clean, _ = vae.quantize(f, SCHED_S)
    assert torch.equal(r.label_bits[0], clean[0])  # nothing before the first scale
    cum = torch.zeros(2, 8, 1, 16, 16)
    changed = 0
    for si, pn in enumerate(SCHED_S):
        res = f.unsqueeze(2) - cum
        if si < len(SCHED_S) - 1:
            res = F.interpolate(res, size=pn, mode="area")
        hand = (res > 0)[:, :, 0].permute(0, 2, 3, 1).to(torch.uint8)  # sign of each bit of the residual
        assert torch.equal(r.label_bits[si], hand), si
        changed += int((r.label_bits[si] != clean[si]).sum())
        codes = F.normalize(r.input_bits[si].float() * 2 - 1, dim=-1).permute(0, 3, 1, 2).unsqueeze(2)
        cum = cum + F.interpolate(codes, size=(1, 16, 16), mode="trilinear")
    assert changed > 0  # the later labels really are re-quantised, not the clean ones


def test_seeded_and_free_of_the_global_rng(vae: BSQVAE) -> None:
    f = features(8, 16)
    state = torch.get_rng_state()
    a = flip_requant(vae, f, SCHED_S, strength=0.3, generator=gen(7))
    torch.manual_seed(123)  # the global RNG plays no part
    b = flip_requant(vae, f, SCHED_S, strength=0.3, generator=gen(7))
    c = flip_requant(vae, f, SCHED_S, strength=0.3, generator=gen(8))
    assert torch.equal(a.x_BLd, b.x_BLd) and a.rates == b.rates
    assert all(torch.equal(x, y) for x, y in zip(a.label_bits, b.label_bits))
    assert not torch.equal(a.x_BLd, c.x_BLd)
    torch.manual_seed(0)
    torch.set_rng_state(state)
    flip_requant(vae, f, SCHED_S, strength=0.3, generator=gen(7))
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_arguments_are_clear_errors(vae: BSQVAE) -> None:
    with pytest.raises(ConfigError, match="Generator"):
        flip_requant(vae, features(8, 16), SCHED_S, strength=0.3)
    with pytest.raises(ConfigError, match="raw features"):
        flip_requant(vae, features(4, 16), SCHED_S, strength=0.0)
    with pytest.raises(ConfigError, match="last scale"):
        flip_requant(vae, features(8, 8), SCHED_S, strength=0.0)
    with pytest.raises(ConfigError, match="bsc"):
        load_config(SubjectTrainConfig, None, ["bsc.strength=1.5"])


def test_recipe_step_with_bsc(toy_subject_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(SubjectTrainConfig, None, [
        f"subject={toy_subject_dir}", "class_noun=dog", f"out_dir={tmp_path}", "model.preset=tiny",
        "model.pn=0.06M", "model.tuned_dtype=fp32", "dtype=fp32", "device=cpu", "batch_size=2",
        "loss.prior=false"])
    assert (cfg.bsc.strength, cfg.bsc.apply_layers, cfg.bsc.requant) == (0.3, 13, True)  # the authors'
    run = setup(cfg)
    idx = torch.tensor([0, 3])
    # instance_batch = flip_requant of the cached features with the run's generator
    state = run.bsc_generator.get_state()
    x, gt = instance_batch(run, idx)
    ref = flip_requant(run.vae, run.features_NdHW[idx], run.schedule, strength=0.3,
                       generator=torch.Generator().set_state(state))
    assert torch.equal(x, ref.x_BLd) and torch.equal(gt, torch.cat([b.flatten(1, 2) for b in ref.label_bits], 1))
    assert gt.shape == (2, sum(h * w for _, h, w in run.schedule), 8) and sum(ref.rates) > 0
    out = train_step(run, idx)
    assert out["loss"] == out["loss"] and out["loss"] > 0 and len(out["acc"]) == 7
    # bsc.strength=0: the clean bits of the photos, as before BSC
    from dataclasses import replace
    run.cfg = replace(cfg, bsc=replace(cfg.bsc, strength=0.0))
    x0, gt0 = instance_batch(run, idx)
    with torch.no_grad():
        bits = run.vae.quantize(run.features_NdHW[idx], run.schedule)[1]
    assert torch.equal(x0, run.vae.bits_to_var_input(bits, run.schedule))
    assert torch.equal(gt0, torch.cat([b.flatten(1, 2) for b in bits], 1))

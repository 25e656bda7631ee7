"""ARBooth losses against a hand computation and against the authors' values (tests/golden/arbooth_tiny*)."""
from __future__ import annotations

import math

import pytest
import torch
from _golden import arbooth_golden, golden_arbooth, split_bits, unpack_text
from golden.seeded import int_to_bits

from arbooth.adapt.arbooth_losses import (
    bitwise_ce_per_token,
    default_scale_weights,
    distill_loss,
    distill_per_token,
    per_scale_bit_accuracy,
    scale_weighted_bitwise_ce,
    token_weights,
)

EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def golden() -> tuple[dict, dict]:
    return arbooth_golden()


@pytest.fixture(scope="module")
def student_logits(golden) -> torch.Tensor:
    """Our model's teacher-forced logits on the golden batch (checked against the fork's in test_infinity)."""
    config, g = golden
    _vae, model, _token = golden_arbooth(config)
    schedule = [tuple(s) for s in config["scale_schedule"]]
    text, mask = unpack_text(g["kv_compact"], config["text"]["lens_after_splice"])
    with torch.no_grad():
        x = model.vae.bits_to_var_input(split_bits(g["train.gt_bits_int"], schedule, config["codebook_dim"]), schedule)
        return model(text, mask, x, schedule)


def test_scale_weights_match_a_hand_computation() -> None:
    schedule = [(1, 1, 1), (1, 2, 2), (1, 3, 3)]
    weights = (1.0, 0.25, 2.0)
    torch.manual_seed(0)
    logits = torch.randn(2, 14, 6)
    bits = torch.randint(0, 2, (2, 14, 3))
    total = 0.0
    for b in range(2):
        for tok in range(14):
            w = 1.0 if tok < 1 else 0.25 if tok < 5 else 2.0
            ce = 0.0
            for i in range(3):
                z0, z1 = logits[b, tok, 2 * i].item(), logits[b, tok, 2 * i + 1].item()
                z = z1 if bits[b, tok, i] else z0
                ce += math.log(math.exp(z0) + math.exp(z1)) - z
            total += w * (ce / 3) / 14
    expected = total / 2
    got = scale_weighted_bitwise_ce(logits, bits, schedule, weights)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert default_scale_weights(10) == (1.0,) * 8 + (0.5, 0.5)
    with pytest.raises(ValueError, match="scale weights"):
        token_weights(schedule, (1.0, 1.0))


def test_instance_loss_matches_the_authors(golden, student_logits) -> None:
    config, g = golden
    schedule = [tuple(s) for s in config["scale_schedule"]]
    w_L = token_weights(schedule, default_scale_weights(len(schedule)))
    torch.testing.assert_close(w_L.expand(2, -1), g["train.scaling_factor"], rtol=0, atol=0)
    # Our logits are within 1e-5 of the fork's; a 2-way cross-entropy has gradient of L1 norm <= 2 in its
    # logits, so each per-bit CE (and any weighted mean of them) moves by at most 2e-5.
    per_tok = bitwise_ce_per_token(student_logits, g["gt_BL"])
    torch.testing.assert_close(per_tok, g["train.loss_per_token"], rtol=0, atol=2e-5)
    loss = scale_weighted_bitwise_ce(student_logits, g["gt_BL"], schedule, default_scale_weights(len(schedule)))
    torch.testing.assert_close(loss, g["train.loss_instance"], rtol=0, atol=2e-5)
    acc = per_scale_bit_accuracy(student_logits, g["gt_BL"], schedule)
    assert len(acc) == len(schedule) and all(0 <= a <= 1 for a in acc)


@pytest.mark.parametrize("which", ["greedy", "sampled"])
def test_distillation_matches_the_authors(golden, which: str) -> None:
    config, g = golden
    stride = config["strides"]["distill_logits"]  # the file keeps every stride-th token's logits
    teacher = g[f"teacher.{which}.ori_logits_strided"]
    student = g[f"reg.{which}.reg_logits_strided"]
    kl_ref = g[f"reg.{which}.kl_per_token"]
    kl = distill_per_token(student, teacher)
    # Tolerance from float32 rounding, not from one machine: KL = sum_v p_v (log p_v - log q_v) is a
    # difference of nearly equal logs. Each log-softmax entry z_v - logsumexp(z) carries a few ulps of
    # its operands' size (|z| + logsumexp <= max|z| + max|z| + log V); the KL is a p-weighted sum of such
    # differences (weights summing to 1), so its absolute error is <= c * eps * (max|s| + max|t| + log V),
    # with c = 8 covering the exp / log / sum roundings of both softmaxes. No relative term: near zero a
    # relative tolerance means nothing.
    V = teacher.shape[-1]
    atol = 8 * EPS * (student.abs().max().item() + teacher.abs().max().item() + math.log(V))
    torch.testing.assert_close(kl, kl_ref[:, ::stride], rtol=0, atol=atol)
    # the authors' loss is reg_lambda * batch mean of (1/L) sum_L KL: our reduction over the same tokens;
    # a float32 sum of n terms is exact to ~log2(n) eps relative (pairwise), 1e-5 leaves a margin of 5
    reg_lambda = config["losses"]["reg_lambda"]
    torch.testing.assert_close(reg_lambda * kl_ref.mean(), g[f"reg.{which}.reg_loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(distill_loss(student, teacher), kl.mean(), rtol=1e-5, atol=0)
    B, L, V = teacher.shape
    reg_gt = int_to_bits(g[f"reg.{which}.reg_gt_bits_int"], V // 2)[:, ::stride]
    assert torch.equal(teacher.reshape(B, L, V // 2, 2).argmax(-1).to(torch.uint8), reg_gt)


def test_distillation_zero_for_identical_logits_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 5, 8)
    for over in ("token", "bit"):
        assert distill_loss(t, t, softmax_over=over).abs().item() < 1e-6
        assert distill_loss(t + 0.3 * torch.randn_like(t), t, softmax_over=over).item() > 1e-4
    # per-bit KL is the KL between the factorised bit distributions: check one token by hand
    s, t1 = torch.randn(1, 1, 4), torch.randn(1, 1, 4)
    p = torch.softmax(t1.reshape(2, 2), -1)
    q = torch.softmax(s.reshape(2, 2), -1)
    hand = (p * (p.log() - q.log())).sum()
    got = distill_per_token(s, t1, softmax_over="bit")
    assert got.item() == pytest.approx(hand.item(), rel=1e-5)
    # hard: CE against the teacher's argmax bits
    hard = distill_per_token(s, t1, kind="hard")
    bits = t1.reshape(1, 1, 2, 2).argmax(-1)
    assert hard.item() == pytest.approx(bitwise_ce_per_token(s, bits).item())

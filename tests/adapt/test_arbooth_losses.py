"""ARBooth losses against a hand computation and against the authors' values in arbooth_tiny.pt."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from arbooth.adapt.arbooth_losses import (
    bitwise_ce_per_token,
    default_scale_weights,
    distill_loss,
    distill_per_token,
    per_scale_bit_accuracy,
    scale_weighted_bitwise_ce,
    token_weights,
)


@pytest.fixture(scope="module")
def golden(shared_dir: Path) -> dict:
    return torch.load(shared_dir / "golden/infinity/arbooth_tiny.pt", weights_only=True)


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


def test_instance_loss_matches_the_authors(golden: dict) -> None:
    schedule = [tuple(s) for s in golden["config"]["scale_schedule"]]
    tr = golden["train"]
    w_L = token_weights(schedule, default_scale_weights(len(schedule)))
    torch.testing.assert_close(w_L.expand(2, -1), tr["scaling_factor"], rtol=0, atol=0)
    per_tok = bitwise_ce_per_token(tr["logits"], tr["gt_BL"])  # the file stores it before weighting
    torch.testing.assert_close(per_tok, tr["loss_per_token"], rtol=1e-5, atol=1e-6)
    loss = scale_weighted_bitwise_ce(tr["logits"], tr["gt_BL"], schedule, default_scale_weights(len(schedule)))
    torch.testing.assert_close(loss, tr["loss_instance"], rtol=1e-5, atol=1e-7)
    acc = per_scale_bit_accuracy(tr["logits"], tr["gt_BL"], schedule)
    assert len(acc) == len(schedule) and all(0 <= a <= 1 for a in acc)


@pytest.mark.parametrize("which", ["greedy", "sampled"])
def test_distillation_matches_the_authors(golden: dict, which: str) -> None:
    teacher = golden["teacher"][which]["ori_logits_BLV"]
    reg = golden["reg"][which]
    kl = distill_per_token(reg["reg_logits"], teacher)
    torch.testing.assert_close(kl, reg["kl_per_token"], rtol=1e-4, atol=1e-7)
    reg_lambda = golden["config"]["losses"]["reg_lambda"]
    torch.testing.assert_close(reg_lambda * distill_loss(reg["reg_logits"], teacher), reg["reg_loss"],
                               rtol=1e-4, atol=1e-8)
    B, L, V = teacher.shape
    assert torch.equal(teacher.reshape(B, L, V // 2, 2).argmax(-1).to(torch.uint8), reg["reg_gt_BL"])


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

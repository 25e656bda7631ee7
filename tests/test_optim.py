"""The bf16 stochastic-rounding AdamW: unbiased rounding, torch's AdamW for fp32, and small updates
that plain bf16 AdamW loses survive in expectation."""
import torch

from arbooth.optim import StochasticRoundingAdamW, stochastic_round_to_bf16


def test_rounding_is_unbiased_and_lands_on_neighbours():
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    hi = (lo.float() + 2 ** -7).to(torch.bfloat16)  # bf16 ulp at 1.0 is 2^-7
    for sign in (1.0, -1.0):
        x = torch.full((200_000,), sign * (1.0 + 0.3 * 2 ** -7))
        r = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0)).float()
        assert set(r.abs().unique().tolist()) == {lo.item(), hi.item()}
        assert abs(r.mean().item() - x[0].item()) < 2e-5  # plain rounding would give exactly 1.0
    exact = torch.tensor([1.0, -2.5, 0.0])
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)


def test_fp32_parameters_follow_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ours = StochasticRoundingAdamW([a], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def test_small_updates_survive_in_bf16():
    w0 = torch.ones(20_000, dtype=torch.bfloat16)
    plain, sr = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_plain = torch.optim.AdamW([plain], lr=2.34375e-5, weight_decay=0.0)
    opt_sr = StochasticRoundingAdamW([sr], lr=2.34375e-5, weight_decay=0.0, generator=torch.Generator().manual_seed(0))
    for _ in range(20):  # a constant gradient: every step moves the weight down by ~lr
        plain.grad = torch.ones_like(plain)
        sr.grad = torch.ones_like(sr)
        opt_plain.step()
        opt_sr.step()
    assert torch.equal(plain.detach(), w0)  # plain bf16 AdamW loses all 20 updates
    moved = 1.0 - sr.detach().float().mean().item()
    assert abs(moved - 20 * 2.34375e-5) < 0.1 * 20 * 2.34375e-5

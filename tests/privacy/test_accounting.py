"""Noise calibration, accounting, the budget guard and empty Poisson batches."""
from __future__ import annotations

import pytest
import torch
from dp_tiny import CLASSES, VOCAB, TinyNet, make_views, row_loss, trainable
from opacus.accountants import PRVAccountant
from torch import nn
from torch.utils.data import TensorDataset

from arbooth.privacy.accountants import PLDAccountant, WideRDPAccountant
from arbooth.privacy.engine import PrivacyBudgetExceeded, calibrate_noise, make_private


def _dataset(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, VOCAB, (n, 3), generator=g),
                         torch.randint(0, CLASSES, (n, 3), generator=g))


def _train_steps(pt, k: int, steps: int) -> int:
    """Run up to `steps` logical steps over the Poisson loader; returns how many batches were empty."""
    empty, done = 0, 0
    while done < steps:
        for tok_BT, y_BT in pt.data_loader:
            empty += tok_BT.shape[0] == 0
            pt.optimizer.zero_grad()
            pt.backward(row_loss(pt.module(make_views(tok_BT, k)), y_BT.repeat_interleave(k, 0)))
            pt.optimizer.step()
            done += 1
            if done == steps:
                break
    return empty


@pytest.mark.parametrize("clipping", ["explicit", "ghost", "book_keeping"])
def test_noise_has_calibrated_std(clipping: str) -> None:
    """Zero-gradient model: p.grad is pure noise, std sigma * C / expected batch size, in every clipping
    mode (mutant caught, issue 28: the optimizer's C replaced by 1.0 in the default modes)."""
    model = nn.Linear(100, 100)
    ds = TensorDataset(torch.zeros(40, 100))
    sigma, c, q = 1.3, 0.7, 0.25
    pt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), ds, target_epsilon=float("inf"),
                      delta=1e-5, sample_rate=q, steps=1, max_grad_norm=c, noise_multiplier=sigma,
                      clipping=clipping, noise_generator=torch.Generator().manual_seed(0))
    draws = []
    for _ in range(5):
        pt.optimizer.zero_grad()
        pt.backward((pt.module(torch.randn(8, 100)) * 0.0).sum(1))
        pt.optimizer.step()
        draws.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    noise = torch.cat(draws)                              # 50,500 draws
    expected = sigma * c / pt.optimizer.expected_batch_size
    assert abs(noise.mean().item()) < 0.02 * expected
    assert noise.std().item() == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("accountant", ["pld", "rdp", "prv"])
def test_epsilon_matches_opacus_accountant_and_stays_under_target(accountant: str) -> None:
    n, q, steps, target, delta = 64, 0.25, 6, 3.0, 1 / 64
    model = TinyNet()
    pt = make_private(model, torch.optim.SGD(trainable(model), lr=0.1), _dataset(n), target_epsilon=target,
                      delta=delta, sample_rate=q, steps=steps, max_grad_norm=1.0, views=2,
                      accountant=accountant, sampling_generator=torch.Generator().manual_seed(0))
    assert pt.noise_multiplier == calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q,
                                                  steps=steps, accountant=accountant)
    _train_steps(pt, 2, steps)
    reference = {"pld": lambda: PLDAccountant(epsilon_hint=target), "rdp": WideRDPAccountant,
                 "prv": PRVAccountant}[accountant]()
    reference.history = [(pt.noise_multiplier, q, steps)]
    assert pt.steps_taken == steps
    assert pt.epsilon() == pytest.approx(reference.get_epsilon(delta), rel=1e-6)
    assert pt.epsilon() <= target


def test_refuses_the_step_that_would_exceed_the_budget() -> None:
    model = TinyNet()
    pt = make_private(model, torch.optim.SGD(trainable(model), lr=0.5), _dataset(32), target_epsilon=2.0,
                      delta=1e-3, sample_rate=0.5, steps=3, max_grad_norm=1.0,
                      sampling_generator=torch.Generator().manual_seed(1))
    _train_steps(pt, 1, 3)
    spent = pt.epsilon()
    before = [p.detach().clone() for p in trainable(model)]
    with pytest.raises(PrivacyBudgetExceeded, match="step 4"):
        _train_steps(pt, 1, 1)
    assert pt.steps_taken == 3 and pt.epsilon() == spent <= 2.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainable(model)))


@pytest.mark.parametrize("clipping", ["explicit", "ghost", "book_keeping"])
def test_empty_poisson_batch_does_not_crash(clipping: str) -> None:
    """q so small that most batches are empty: the step still runs (noise only) and is accounted."""
    model = TinyNet()
    pt = make_private(model, torch.optim.SGD(trainable(model), lr=0.1), _dataset(8),
                      target_epsilon=float("inf"), delta=1e-3, sample_rate=0.02, steps=10, max_grad_norm=1.0,
                      views=2, clipping=clipping, noise_multiplier=1.0,
                      sampling_generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in trainable(model)]
    assert _train_steps(pt, 2, 10) >= 5
    assert pt.steps_taken == 10
    assert all(torch.isfinite(p).all() for p in trainable(model))
    assert not all(torch.equal(a, b) for a, b in zip(before, trainable(model)))  # noise was released


def test_logical_batches_through_batch_memory_manager() -> None:
    """Physical batches of 2 examples (x3 views) add up to one step per Poisson batch."""
    model = TinyNet()
    pt = make_private(model, torch.optim.SGD(trainable(model), lr=0.1), _dataset(40),
                      target_epsilon=float("inf"), delta=1e-3, sample_rate=0.5, steps=2, max_grad_norm=1.0,
                      views=3, noise_multiplier=0.5, sampling_generator=torch.Generator().manual_seed(0))
    physical = 0
    with pt.physical_batches(2) as loader:
        for tok_BT, y_BT in loader:
            assert tok_BT.shape[0] <= 2
            pt.optimizer.zero_grad()
            pt.backward(row_loss(pt.module(make_views(tok_BT, 3)), y_BT.repeat_interleave(3, 0)))
            pt.optimizer.step()
            physical += 1
    assert physical > pt.steps_taken == len(pt.data_loader) == 2


@pytest.mark.parametrize("key,value", [("max_grad_norm", 0.5), ("sample_rate", 0.3), ("delta", 1e-4),
                                       ("target_epsilon", 4.0), ("views", 3)])
def test_a_dp_state_of_other_privacy_settings_is_refused(key: str, value: float) -> None:
    """Mutant caught (issue 28): `PrivateTraining.load_state_dict` accepting a state written with another
    C, q, delta, target or view count (the accountant's history would then be wrong for this run)."""
    from arbooth.errors import CheckpointError

    def make(**over):
        kw = {"max_grad_norm": 1.0, "sample_rate": 0.25, "delta": 1e-3, "target_epsilon": 3.0, "views": 2, **over}
        model = TinyNet()
        return make_private(model, torch.optim.SGD(trainable(model), lr=0.1), _dataset(16), steps=2,
                            noise_multiplier=1.0, **kw)
    state = make().state_dict()
    make().load_state_dict(state)  # the same settings: fine
    with pytest.raises(CheckpointError, match=f"other privacy settings: {key}"):
        make(**{key: value}).load_state_dict(state)

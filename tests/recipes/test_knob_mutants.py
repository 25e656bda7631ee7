"""Issue 28, 'tests that would not notice a bug': knobs whose effect no test observed. Each test was checked
by hand against the mutant named in its docstring."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arbooth.adapt.arbooth_losses import distill_per_token
from arbooth.config import load_config
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_subject import setup, train_step


def test_distillation_temperature_scales_both_distributions() -> None:
    """Mutant: the temperature ignored (every other test uses T = 1)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    for T in (0.5, 2.0):
        p = torch.softmax(t / T, -1)
        want = (p * (torch.log(p) - torch.log_softmax(s / T, -1))).sum(-1)
        torch.testing.assert_close(distill_per_token(s, t, temperature=T), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(distill_per_token(s, t, temperature=2.0), distill_per_token(s, t))


def _one_step(subject: Path, out: Path, *overrides: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The first step's metrics and the parameter change it made (tiny model, fp32, combined update)."""
    cfg = load_config(SubjectTrainConfig, None, [
        f"subject={subject}", "class_noun=dog", f"out_dir={out}", "model.preset=tiny", "model.pn=0.06M",
        "model.tuned_dtype=fp32", "dtype=fp32", "device=cpu", "batch_size=2", "bsc.strength=0.0",
        "optim.step_mode=combined", "model.cond_drop_rate=0.0", *overrides])
    run = setup(cfg)
    run.model.train()
    before = {k: v.detach().clone() for k, v in run.tuner.params.items()}
    m = train_step(run, torch.tensor([0, 1]))
    return m, {k: run.tuner.params[k].detach() - before[k] for k in before}


def test_reg_lambda_reaches_the_update_not_only_the_log(toy_subject_dir: Path, tmp_path: Path) -> None:
    """Mutant: the update uses the distillation loss without loss.reg_lambda while the log shows it scaled.
    Adam's first step is about lr * sign(gradient), so lambda shows in the direction of the combined
    gradient: lambda 0 moves the weights exactly as no prior loss, lambda 0.5 not as lambda 1."""
    _, none = _one_step(toy_subject_dir, tmp_path / "a", "loss.prior=false")
    _, zero = _one_step(toy_subject_dir, tmp_path / "b", "loss.reg_lambda=0.0")
    half_m, half = _one_step(toy_subject_dir, tmp_path / "c", "loss.reg_lambda=0.5")
    one_m, one = _one_step(toy_subject_dir, tmp_path / "d", "loss.reg_lambda=1.0")
    assert all(torch.equal(zero[k], none[k]) for k in none)
    assert half_m["distill"] == pytest.approx(one_m["distill"] / 2, rel=1e-5)
    assert any(not torch.equal(half[k], one[k]) for k in one)


def test_distillation_temperature_reaches_the_recipe(toy_subject_dir: Path, tmp_path: Path) -> None:
    """Mutant: the recipe calling distill_loss without loss.distill_temperature."""
    m1, _ = _one_step(toy_subject_dir, tmp_path / "a", "loss.distill_temperature=1.0")
    m2, _ = _one_step(toy_subject_dir, tmp_path / "b", "loss.distill_temperature=3.0")
    assert m1["loss"] == m2["loss"] and m1["distill"] != m2["distill"]

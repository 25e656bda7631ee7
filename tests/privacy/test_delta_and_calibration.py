"""Issue 28 kind 3: a large delta is refused before anything loads, calibration ends in bounded time with a
true message for every accountant, and a negative epsilon from an accountant is 0, not infinity."""
from __future__ import annotations

import math
import time
import warnings

import pytest
from _class_tiny import tiny_config, write_dataset

from arbooth.cli import main as cli
from arbooth.config import from_dict, save_config, to_dict
from arbooth.errors import ConfigError
from arbooth.privacy.accountants import calibrate_noise, epsilon_of
from arbooth.recipes.class_dp_config import ClassDPConfig


@pytest.mark.parametrize("accountant", ["pld", "rdp", "prv"])
def test_a_negative_epsilon_is_zero_not_infinity(accountant):
    """RDP's conversion gives a negative epsilon at delta 0.99; mapped to infinity it made every sigma look
    infeasible ("no noise multiplier up to 1e+06 meets the budget"). PRV cannot compute one there (inf)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps = epsilon_of(accountant, sigma=1.0, sample_rate=0.01, steps=10, delta=0.99)
    assert eps == (math.inf if accountant == "prv" else 0.0)


@pytest.mark.parametrize("accountant,delta", [("pld", 0.99), ("pld", 0.1), ("prv", 0.99)])
def test_a_target_that_does_not_bind_ends_quickly_with_a_true_message(accountant, delta):
    """pld halved sigma 64 times (each evaluation slower: > 5 minutes); prv said no sigma meets the budget."""
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate_noise(target_epsilon=10, delta=delta, sample_rate=0.01, steps=10, accountant=accountant)
    text = str(e.value)
    assert time.perf_counter() - t0 < 60 and "\n" not in text and "up to 1e+06" not in text
    assert ("does not bind" in text and "epsilon 0" in text) if accountant == "pld" else \
        "cannot compute epsilon at this delta" in text


def test_calibration_reads_a_negative_epsilon_as_met():
    calls = []

    def eps(sigma: float) -> float:
        calls.append(sigma)
        return -3.0  # an accountant's negative value: met by every sigma
    with pytest.raises(ConfigError, match="does not bind: even noise multiplier 0.05 spends only epsilon 0"):
        calibrate_noise(target_epsilon=10, delta=0.5, sample_rate=0.01, steps=10, epsilon_fn=eps)
    assert min(calls) >= 0.05 and len(calls) <= 8
    with pytest.raises(ConfigError, match=r"delta must lie in \(0, 1\)"):
        calibrate_noise(target_epsilon=10, delta=1.0, sample_rate=0.01, steps=10)


def test_delta_above_one_over_n_is_refused_before_the_model_loads(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")  # 16 images (_class_tiny): 1/N = 0.0625
    base = to_dict(tiny_config(data, tmp_path / "out"))
    base["privacy"] = {"sample_rate": 0.5, "delta": 0.5, "noise_seed": 0}
    save_config(from_dict(ClassDPConfig, base), tmp_path / "dp.yaml")
    assert cli(["train-class", "--config", str(tmp_path / "dp.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "privacy.delta=0.5 is above 1/N = 1/16" in err[0], err
    assert not (tmp_path / "out" / "checkpoints").exists()
    cfg = from_dict(ClassDPConfig, {**base, "privacy": {**base["privacy"], "allow_large_delta": True}})
    assert cfg.privacy.check_delta(16) == 0.5  # the explicit override
    assert from_dict(ClassDPConfig, {**base, "privacy": {"delta": None}}).privacy.check_delta(16) == 1 / 16


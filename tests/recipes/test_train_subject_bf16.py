"""bf16 tuned weights (the authors' setting for Infinity-2B) get the stochastic-rounding AdamW
(tests/test_optim.py shows plain AdamW on bf16 loses lr=2.3e-5 updates and this one keeps them)."""
from pathlib import Path

import pytest
import torch

from arbooth.config import load_config
from arbooth.optim import StochasticRoundingAdamW
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_subject import setup

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("tuned_dtype, dtype, stochastic_rounding, expected", [
    ("bf16", "bf16", True, StochasticRoundingAdamW),
    ("bf16", "bf16", False, torch.optim.AdamW),   # the authors' plain AdamW, on request
    ("fp32", "fp32", True, torch.optim.AdamW),    # fp32 weights need no rounding
])
def test_optimizer_choice(tuned_dtype, dtype, stochastic_rounding, expected, tmp_path):
    cfg = load_config(SubjectTrainConfig, ROOT / "configs" / "subject" / "toy.yaml",
                      [f"subject={ROOT / 'subjects' / 'toy_star'}", f"out_dir={tmp_path}",
                       f"model.tuned_dtype={tuned_dtype}", f"dtype={dtype}",
                       f"optim.stochastic_rounding={str(stochastic_rounding).lower()}"])
    run = setup(cfg)
    assert type(run.optimizer.optimizer) is expected
    assert {p.dtype for p in run.tuner.params.values()} == {torch.bfloat16 if tuned_dtype == "bf16" else torch.float32}


def test_bf16_blocks_on_cpu_is_a_clear_error(tmp_path):
    from arbooth.errors import ConfigError
    from arbooth.recipes.train_subject import train

    cfg = load_config(SubjectTrainConfig, ROOT / "configs" / "subject" / "toy.yaml",
                      [f"subject={ROOT / 'subjects' / 'toy_star'}", f"out_dir={tmp_path}",
                       "model.tuned_dtype=bf16", "dtype=bf16", "device=cpu"])
    with pytest.raises(ConfigError, match="needs a GPU"):
        train(cfg)

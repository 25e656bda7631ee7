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


def test_bf16_blocks_train_on_the_cpu(tmp_path):
    """The 2B default (bf16 blocks under bf16 autocast) runs on the CPU too, so its path is tested
    here: the tuned tensors stay bf16 and all of them move (test_train_subject.py checks the rest stays)."""
    from arbooth.adapt.personalization import load_personalization
    from arbooth.recipes.train_subject import train

    cfg = load_config(SubjectTrainConfig, ROOT / "configs" / "subject" / "toy.yaml",
                      [f"subject={ROOT / 'subjects' / 'toy_star'}", f"out_dir={tmp_path}", "steps=2",
                       "model.tuned_dtype=bf16", "dtype=bf16", "device=cpu", "optim.lr=1e-3",
                       "validate_every=2"])
    base = {k: v.detach().clone() for k, v in setup(cfg).model.named_parameters()}
    p = load_personalization(train(cfg))
    assert p.tensors and {v.dtype for v in p.tensors.values()} == {torch.bfloat16}
    moved = [k for k, v in p.tensors.items() if not torch.equal(v, base[k].to(torch.bfloat16))]
    assert len(moved) == len(p.tensors), "every tuned tensor should move at lr 1e-3"
    assert torch.isfinite(p.subject_token_PC).all() and p.subject_token_PC.abs().sum() > 0
    assert (tmp_path / "val" / "step_000002.png").is_file()  # validation samples with the bf16 blocks

"""The shipped DP configs load and validate (without building a model) and carry the paper's values."""
from __future__ import annotations

from pathlib import Path

import pytest

from arbooth.errors import ConfigError
from arbooth.privacy.config import PrivacyConfig
from arbooth.recipes.class_config import ClassTrainConfig
from arbooth.recipes.train_class_dp import ClassDPConfig, load_class_config

DP = Path(__file__).resolve().parents[2] / "configs" / "class" / "dp"
TABLE8 = {"fft": (1e-4, 180, 0.1, 128), "lora": (5e-4, 80, 0.5, 128), "lntuning": (5e-4, 100, 0.5, 128)}


@pytest.mark.parametrize("method", sorted(TABLE8))
def test_table8_configs(method: str) -> None:
    cfg = load_class_config(DP / f"flowers102_{method}.yaml")
    assert isinstance(cfg, ClassDPConfig) and cfg.method.name == method
    lr, epochs, c, k = TABLE8[method]
    p = cfg.privacy
    assert (cfg.optim.lr, cfg.train.epochs, p.max_grad_norm, p.aug_multiplicity) == (lr, epochs, c, k)
    assert (p.epsilons, p.sample_rate, p.delta) == ((10.0,), 0.251, None)
    assert (p.accountant, p.clipping) == ("pld", "book_keeping")  # tightest robust accountant, fastest exact mode


def test_sweep_is_one_config_with_a_list_and_overridable() -> None:
    cfg = load_class_config(DP / "flowers102_lora_sweep.yaml")
    assert cfg.privacy.epsilons == (1, 10, 20, 50, 100, 500, 1000) and cfg.privacy.aug_multiplicity == 32
    one = load_class_config(DP / "flowers102_lora_sweep.yaml", ["privacy.epsilon=10"])
    assert one.privacy.epsilons == (10.0,) and not one.privacy.is_sweep
    assert sorted(p.name for p in DP.glob("*.yaml")) == [f"flowers102_{m}.yaml" for m in
                                                         ("fft", "lntuning", "lora", "lora_sweep")]


def test_no_privacy_section_gives_the_plain_config_and_bad_values_are_errors() -> None:
    assert type(load_class_config(None, ["method.name=lora"])) is ClassTrainConfig
    assert isinstance(load_class_config(None, ["privacy.epsilon=3"]), ClassDPConfig)
    for bad in (["privacy.epsilon=0"], ["privacy.sample_rate=1.5"], ["privacy.accountant=gdp"], ["privacy.clipping=fast"],
                ["privacy.aug_multiplicity=0"], ["privacy.epsilon=[1, -2]"], ["privacy.typo=1"]):
        with pytest.raises(ConfigError):
            load_class_config(None, bad)
    assert PrivacyConfig().delta_for(200) == 1 / 200


def test_dp_safe_resume_keys_are_the_plain_ones_without_the_step_budget() -> None:
    from arbooth.recipes import train_class, train_class_dp

    plain, private = set(train_class.SAFE_RESUME_KEYS), set(train_class_dp.SAFE_RESUME_KEYS)
    assert private == plain - {"train.max_steps", "train.epochs"}
    assert not any(k.startswith("privacy") for k in private)

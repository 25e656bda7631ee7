from dataclasses import dataclass, field
from typing import Literal

import pytest

from arbooth.config import ConfigError, load_config, parse_overrides, save_config, to_dict


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError("lr must be positive")


@dataclass(frozen=True)
class Cfg:
    method: Literal["fft", "lora"] = "fft"
    epochs: int = 3
    name: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: lora\noptim:\n  lr: 0.001\n")
    cfg = load_config(Cfg, p, ["epochs=7", "optim.betas=[0.5, 0.6]", "name=run1"])
    assert cfg == Cfg(method="lora", epochs=7, name="run1", optim=Optim(lr=1e-3, betas=(0.5, 0.6)))
    # PyYAML reads 1e-4 (no decimal point) as a string; a float field must still take it
    assert load_config(Cfg, None, ["optim.lr=1e-4"]).optim.lr == 1e-4


def test_round_trip(tmp_path):
    cfg = Cfg(method="lora", optim=Optim(lr=2e-4))
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(Cfg, tmp_path / "out.yaml") == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.95]


@pytest.mark.parametrize("override, message", [
    (["epoch=3"], "unknown key"),
    (["optim.lrr=3"], "optim.lrr"),
    (["epochs=three"], "expected an integer"),
    (["method=dora"], "not one of"),
    (["optim.lr=-1"], "lr must be positive"),
    (["optim.betas=[0.9]"], "expected 2 values"),
    (["noequals"], "key=value"),
])
def test_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, None, override)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, tmp_path / "bad.yaml")


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1,2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}

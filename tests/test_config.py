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


def test_flag_values_are_set_as_given_and_win_over_overrides(tmp_path):
    """One way (config.load_config(values=...)) for every command to put its path flags into a config:
    a path that YAML would read as a number or a bool stays a string; validation runs once, on the result."""
    import argparse

    from arbooth.commands import train_class, train_subject
    from arbooth.config import flag_values
    from arbooth.recipes.class_dp_config import load_class_config

    args = argparse.Namespace(data="1e5", manifest=None, vae_ckpt="yes", var_ckpt="null", out_dir=None)
    cfg = load_class_config(None, ["train.out_dir=runs/x", "data.root=elsewhere"],
                            values=flag_values(args, train_class.PATH_FLAGS))
    assert (cfg.data.root, cfg.data.manifest, cfg.model.vae_ckpt, cfg.model.var_ckpt, cfg.train.out_dir) == \
        ("1e5", None, "yes", "null", "runs/x")
    parser = argparse.ArgumentParser()
    train_subject.add_arguments(parser)
    sub = train_subject.build_config(parser.parse_args(["--tiny", "--subject", "on", "--out", "12", "--class-noun",
                                                        "no", "steps=2"]))
    assert (sub.subject, sub.out_dir, sub.class_noun, sub.steps) == ("on", "12", "no", 2)


def test_malformed_class_config_is_one_config_error_line(tmp_path):
    """Issue 23.6: load_class_config parsed the YAML outside the guard, so a malformed file escaped as a
    yaml traceback instead of one ConfigError line."""
    from arbooth.recipes.class_dp_config import load_class_config

    (tmp_path / "bad.yaml").write_text("train:\n  out_dir: [runs\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML") as e:
        load_class_config(tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        load_class_config(tmp_path / "missing.yaml")


def test_a_bad_override_is_attributed_to_the_command_line_not_the_file(tmp_path):
    """The file is valid; the unknown key came from an override: the error says so (a new-user trial saw the
    file blamed for a key it did not hold)."""
    import pytest as _pytest

    from arbooth.config import load_config
    from arbooth.errors import ConfigError
    from arbooth.recipes.subject_config import SubjectTrainConfig

    path = tmp_path / "ok.yaml"
    path.write_text("steps: 3\n")
    assert load_config(SubjectTrainConfig, path).steps == 3
    with _pytest.raises(ConfigError, match=r"ok.yaml with the command-line overrides: unknown key\(s\) optim.lrr"):
        load_config(SubjectTrainConfig, path, ["optim.lrr=1"])

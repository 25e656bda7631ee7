"""Bad config values are one ConfigError line naming the key, printed by the CLI before any checkpoint is
read; cross-field rules (scale weights vs schedule, LoRA alpha vs rank, placeholder) hold at parse time."""
from __future__ import annotations

from pathlib import Path

import pytest

from arbooth.adapt.methods import MethodConfig
from arbooth.cli import main
from arbooth.config import load_config
from arbooth.errors import ConfigError
from arbooth.recipes.subject_config import PromptConfig, SubjectTrainConfig
from arbooth.subject_bases import SUBJECT_PRESETS, ModelConfig


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"arbooth {command}: error: "), err
    return line


def test_scale_weights_of_the_wrong_length_fail_before_any_checkpoint_is_read(tmp_path: Path, capsys) -> None:
    # the checkpoint paths do not exist: reading any of them would be a different (CheckpointError) line
    rc = main(["train-subject", "--subject", str(tmp_path / "subject"), "--model-ckpt", str(tmp_path / "no.pth"),
               "--vae-ckpt", str(tmp_path / "no_vae.pth"), "--t5", str(tmp_path / "no_t5"),
               "--config", "configs/subject/infinity_2b.yaml", "model.pn=1M", "loss.scale_weights=[1.0,1.0,1.0]",
               f"out_dir={tmp_path / 'out'}"])
    assert rc == 2
    line = _one_error_line(capsys, "train-subject")
    assert "loss.scale_weights has 3 entries" in line and "13 scales" in line
    assert not (tmp_path / "out").exists()


def test_negative_lora_rank_fails_before_any_checkpoint_is_read(tmp_path: Path, capsys) -> None:
    rc = main(["train-class", "--config", "configs/class/flowers102_lora_d16.yaml", "--data", str(tmp_path),
               "--vae-ckpt", str(tmp_path / "no_vae.pth"), "--var-ckpt", str(tmp_path / "no_var.pth"),
               "method.lora_rank=-4"])
    assert rc == 2
    assert "method.lora_rank must be >= 1, got -4" in _one_error_line(capsys, "train-class")


def test_scale_weights_must_match_the_schedule_exactly() -> None:
    loss = load_config(SubjectTrainConfig, None, ["loss.scale_weights=[1.0,1.0,0.5]"]).loss
    assert loss.weights_for(3) == (1.0, 1.0, 0.5)
    for n in (2, 4):  # neither cut off nor padded
        with pytest.raises(ConfigError, match="loss.scale_weights has 3 entries"):
            loss.weights_for(n)


def test_lora_alpha_follows_the_rank_unless_set() -> None:
    assert MethodConfig().alpha == 32 and MethodConfig(lora_rank=8).alpha == 16
    assert MethodConfig(lora_rank=8, lora_alpha=5).alpha == 5
    with pytest.raises(ConfigError, match="method.lora_alpha"):
        MethodConfig(lora_alpha=0)


@pytest.mark.parametrize(("field", "value", "key"), [
    ("placeholder", "<S *>", "prompts.placeholder"),
    ("instance_template", "a photo of {cls}", "prompts.instance_template"),
    ("class_template", "a photo of {token} {cls}", "prompts.class_template"),
    ("validation", ("a <S*> dog on the beach",), "prompts.validation"),
])
def test_placeholder_consistency(field: str, value, key: str) -> None:
    PromptConfig()  # the defaults are consistent
    with pytest.raises(ConfigError, match=key):
        PromptConfig(**{field: value})


def test_preset_names_are_the_registry() -> None:
    """`model.preset` is checked against SUBJECT_PRESETS itself (one owner of the names): every entry is
    accepted, anything else is one ConfigError that lists them."""
    for name in SUBJECT_PRESETS:
        assert ModelConfig(preset=name).preset == name
    with pytest.raises(ConfigError, match="unknown preset 'infinity_3b'.*infinity_2b"):
        ModelConfig(preset="infinity_3b")


@pytest.mark.parametrize("override", ["stages=[bogus]", "stages=[]", "vae_steps=-1", "model_batch=0",
                                      "model_bsc_strength=1.5"])
def test_pretrain_toy_refuses_bad_config_before_writing(override, tmp_path, capsys):
    """A bad pretrain-toy config is one error line (exit 2) and writes nothing: before this check an unknown
    stage rewrote the package's toy.json and exited 0."""
    out = tmp_path / "toy"
    assert main(["pretrain-toy", f"out={out}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0].lower(), err
    assert not out.exists()


@pytest.mark.parametrize("command", ["pretrain-toy", "pretrain-toy-class"])
def test_pretrain_commands_refuse_a_file_as_output_folder(command, tmp_path, capsys):
    """Both toy pretrainings check `out` before training: a file where the folder should be is one line."""
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    assert main([command, f"out={blocker}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0].lower(), err

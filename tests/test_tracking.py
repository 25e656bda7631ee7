"""log.report_to through accelerate's trackers in all three trainers: TensorBoard event files (read back
with TensorBoard's own reader) hold the scalars and at least one image; metrics.jsonl in every run
folder; W&B offline when installed; every result folder carries a model card; a missing tracker package
is one line before anything is written."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from _class_tiny import tiny_config, write_dataset
from huggingface_hub import ModelCard

from arbooth.config import from_dict, load_config, to_dict
from arbooth.errors import ConfigError
from arbooth.recipes.subject_config import SubjectTrainConfig

ROOT = Path(__file__).resolve().parents[1]
needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(folder).rglob("events.out.tfevents.*"))
    assert files, f"no event files under {folder}"
    accs = []
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        accs.append(acc)
    scalars = {t for a in accs for t in a.Tags()["scalars"]}
    images = {t for a in accs for t in a.Tags()["images"]}
    return scalars, images


def _class_cfg(tmp_path: Path, **log):
    data = write_dataset(tmp_path / "data")
    return tiny_config(data, tmp_path / "run", "lora", train={"max_steps": 2},
                       log={"report_to": "tensorboard", "every": 1, "sample_every": 2, "sample_classes": [0],
                            "sample_per_class": 1, **log})


@needs_tb
def test_train_class_tensorboard_scalars_images_jsonl_and_card(tmp_path):
    from arbooth.recipes.train_class import train

    cfg = _class_cfg(tmp_path)
    train(cfg)
    scalars, images = _events(tmp_path / "run" / "tensorboard")
    assert {"loss", "acc", "acc_last", "lr"} <= scalars and images
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "loss" in rows[0]
    card = ModelCard.load(tmp_path / "run" / "final" / "README.md")
    assert card.data.library_name == "arbooth" and "peft" in card.data.tags and card.data.base_model_sha256
    assert (tmp_path / "run" / "final" / "grid.png").is_file()
    # what a user shares names files, not this machine's folders; the result still loads next to its run
    for f in ("README.md", "arbooth.yaml", "adapter_config.json"):
        assert str(tmp_path) not in (tmp_path / "run" / "final" / f).read_text(), f
    from arbooth.adapt.finetuned import load_finetuned
    assert load_finetuned(tmp_path / "run" / "final").method == "lora"


@needs_tb
def test_dp_trainer_logs_epsilon_and_sigma_only(tmp_path):
    from arbooth.recipes.train_class_dp import ClassDPConfig, train

    base = to_dict(_class_cfg(tmp_path))
    base["privacy"] = {"sample_rate": 0.5, "aug_multiplicity": 1, "max_grad_norm": 0.5, "epsilon": 8.0,
                       "max_physical_batch_size": 4, "noise_seed": 0}
    base["train"]["max_steps"] = 2
    run = train(from_dict(ClassDPConfig, base))[0]
    out = tmp_path / "run"
    scalars, images = _events(out / "tensorboard")
    assert scalars == {"epsilon", "sigma", "lr"} and images  # no loss, accuracy or batch size
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in rows] == [["epsilon", "lr", "sigma", "step"]] * 2
    card = ModelCard.load(out / "final" / "README.md")
    assert card.data.epsilon == pytest.approx(run.history[-1]["epsilon"]) and card.data.delta > 0


@needs_tb
def test_train_subject_tensorboard_and_card(tmp_path):
    from arbooth.recipes.train_subject import train

    cfg = load_config(SubjectTrainConfig, ROOT / "configs" / "subject" / "toy.yaml",
                      [f"subject={ROOT / 'subjects' / 'toy_star'}", f"out_dir={tmp_path / 's'}", "steps=2",
                       "validate_every=2", "log.report_to=tensorboard", "prompts.validation=['a {} on the beach']"])
    train(cfg)
    scalars, images = _events(tmp_path / "s" / "tensorboard")
    assert {"loss", "distill", "acc/0", "lr"} <= scalars and images
    assert ModelCard.load(tmp_path / "s" / "README.md").data.library_name == "arbooth"
    from arbooth.adapt.personalization import load_personalization
    meta = load_personalization(tmp_path / "s" / "personalization.safetensors").metadata
    assert str(ROOT) not in meta["config"] and str(tmp_path) not in meta["config"]


def test_missing_tracker_package_is_one_line_before_anything_is_written(tmp_path):
    """(A package that is not installed, by name: wandb when absent, else a config that names it.)"""
    from arbooth.recipes.train_class import train
    from arbooth.tracking import check_report_to

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    with pytest.raises(ConfigError, match="needs the wandb package"):
        check_report_to("all")
    cfg = _class_cfg(tmp_path, report_to="wandb")
    with pytest.raises(ConfigError, match="needs the wandb package"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="log.report_to must be one of"):
        load_config(SubjectTrainConfig, None, ["log.report_to=mlflow"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline(tmp_path, monkeypatch):
    from arbooth.recipes.train_class import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    train(_class_cfg(tmp_path, report_to="wandb"))
    assert list((tmp_path / "run" / "wandb").rglob("*.wandb"))

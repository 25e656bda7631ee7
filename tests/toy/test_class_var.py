"""The shipped tiny class VAR and toy extractor: hash-checked loading through the ordinary class config,
a reproducible pretraining command, and an extractor that tells toy worlds apart."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from arbooth.adapt.finetuned import build_vae_var
from arbooth.cli import main as cli_main
from arbooth.errors import CheckpointError
from arbooth.jobs.toy_class import toy_class_config
from arbooth.toy import class_var as cv
from arbooth.toy.class_eval import features, quality, read_split
from arbooth.toy.class_world import DOWNSTREAM, SOURCE, write_class_dataset


def test_shipped_var_loads_as_an_ordinary_class_model_and_samples(tmp_path):
    cfg = toy_class_config(tmp_path, tmp_path / "run")
    assert cfg.model.var_ckpt.endswith("var.safetensors") and cfg.model.image_size == 16
    _, var = build_vae_var(cfg.model)  # the official-layout loader, key by key
    assert var.num_classes == len(SOURCE.classes) and var.depth == 4
    img = var.generate(torch.tensor([0, 4]), cfg=1.5, top_k=0, top_p=0.0, seed=0)
    assert img.shape == (2, 3, 16, 16) and 0 <= img.min() and img.max() <= 1


def test_loaders_refuse_a_file_that_does_not_match_its_hash(tmp_path):
    folder = tmp_path / "toy_class"
    shutil.copytree(cv.TOY_CLASS_DIR, folder)
    cv.read_manifest(folder)  # intact copy: fine
    data = bytearray((folder / "var.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "var.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="var.safetensors .*sha256"):
        cv.model_fields(folder)
    shutil.copy(cv.TOY_CLASS_DIR / "var.safetensors", folder / "var.safetensors")
    (folder / "extractor.safetensors").unlink()
    with pytest.raises(CheckpointError, match="extractor.safetensors is missing"):
        cv.load_toy_extractor(folder)
    with pytest.raises(CheckpointError, match="pretrain-toy-class"):
        cv.read_manifest(tmp_path)


def test_toy_extractor_separates_worlds_far_more_than_draws_of_one_world(tmp_path):
    """Fixed colour schemes (new_colours) against random colours: far apart. (Shapes alone, e.g.
    new_shapes against source, it barely separates: docs/toy_class.md.)"""
    net = cv.load_toy_extractor()
    a = write_class_dataset(tmp_path / "a", DOWNSTREAM["new_shapes"], train_per_class=1, test_per_class=48, seed=0)
    b = write_class_dataset(tmp_path / "b", DOWNSTREAM["new_shapes"], train_per_class=1, test_per_class=48, seed=1)
    c = write_class_dataset(tmp_path / "c", DOWNSTREAM["new_colours"], train_per_class=1, test_per_class=48, seed=0)
    fa, fb, fc = (features(net, read_split(r / "test")[0]) for r in (a, b, c))
    same, other = quality(fa, fb)["fid"], quality(fa, fc)["fid"]
    assert other > 4 * same, (same, other)


@pytest.mark.slow
def test_pretraining_is_reproducible_from_its_seed(tmp_path):
    args = ["pretrain-toy-class", "vae_steps=3", "var_steps=3", "extractor_steps=3", "var_pool_per_class=4",
            "restart_every=2"]
    for name in ("a", "b"):
        assert cli_main([*args, f"out={tmp_path / name}"]) == 0
    ma, mb = (cv.read_manifest(tmp_path / n) for n in ("a", "b"))
    assert ma["sha256"] == mb["sha256"] and set(ma["sha256"]) == {"vae.safetensors", "var.safetensors",
                                                                  "extractor.safetensors"}


def test_eval_class_with_the_toy_extractor(tmp_path):
    a = write_class_dataset(tmp_path / "a", DOWNSTREAM["new_colours"], train_per_class=1, test_per_class=12)
    b = write_class_dataset(tmp_path / "b", DOWNSTREAM["new_colours"], train_per_class=1, test_per_class=12, seed=1)
    assert cli_main(["eval-class", "--extractor", "toy", "--generated", str(b / "test"), "--reference",
                     str(a / "test"), "--no-cache", "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "eval_class.json").read_text())
    assert report["extractor"] == "toy-feature-net-32" and report["toy_extractor"]
    assert report["metrics"]["n_generated"] == report["metrics"]["n_reference"] == 36

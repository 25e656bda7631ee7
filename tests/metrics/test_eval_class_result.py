"""eval-class --result: a train-class result samples each reference class folder under the label it was
trained with, matched by name (issue 24, scope 4). train-class numbers classes by their sorted folder
names, so of the folders `1`, `2`, `10` the folder `10` is label 1 and `2` is label 2 (the old rule, the
name read as an integer, sampled `10` as label 10, a class the fine-tune never saw)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from _class_tiny import tiny_config
from PIL import Image

from arbooth.adapt.finetuned import load_finetuned
from arbooth.cli import main as cli
from arbooth.recipes.train_class import train
from arbooth.sample_folder import SampleFolder

COLOURS = [(220, 40, 40), (40, 60, 220), (40, 200, 60), (200, 200, 40)]


def _write(root, names, counts, size=12):
    rng = np.random.default_rng(len(names))
    for c, (name, n) in enumerate(zip(names, counts, strict=True)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.clip(np.array(COLOURS[c]) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def _argv(result, gen, ref, *extra):
    return ["eval-class", "--result", str(result), "--generated", str(gen), "--reference", str(ref),
            "--extractor", "random", "--k", "1", "--device", "cpu", "--no-cache", "--cfg", "1.5",
            "--top-k", "0", "--top-p", "0", "--gen-batch-size", "2", *extra]


@pytest.mark.parametrize(("names", "labels"), [(["1", "2", "10"], {"1": 0, "10": 1, "2": 2}),
                                               (["rose", "daisy", "tulip"], {"daisy": 0, "rose": 1, "tulip": 2})])
def test_each_class_is_sampled_under_its_trained_label(names, labels, tmp_path, capsys, caplog):
    data = _write(tmp_path / "data", names, [4, 4, 4])
    run = train(tiny_config(data, tmp_path / "run", "lora", train={"max_steps": 1}))
    final = tmp_path / "run" / "final"
    assert run is not None and final.is_dir()
    ref = _write(tmp_path / "test", names, [2, 1, 3])  # as many samples per class as the test split holds
    gen = tmp_path / "gen"
    with caplog.at_level(logging.INFO, logger="arbooth.commands.eval_class"):
        assert cli(_argv(final, gen, ref)) == 0
    assert "sampled under the label" in caplog.text and f"{names[2]} -> {labels[names[2]]}" in caplog.text
    recs = SampleFolder.open(gen).records()
    per_class = {n: [r for r in recs if r["prompt"] == n] for n in names}
    assert {n: len(v) for n, v in per_class.items()} == dict(zip(names, [2, 1, 3], strict=True))
    assert {r["prompt"]: r["label"] for r in recs} == labels
    # the image filed under a class is the model's image of that class's trained label, from its seed
    var = load_finetuned(final).var
    for r in recs:
        want = var.generate(torch.tensor([r["label"]]), cfg=1.5, top_k=0, top_p=0.0, seed=[r["seed"]])[0]
        got = torch.from_numpy(np.array(Image.open(r["path"]).convert("RGB"))).permute(2, 0, 1) / 255
        assert (got - want).abs().max() <= 1 / 255 + 1e-6, r
    report = json.loads((gen / "eval_class" / "eval_class.json").read_text())
    assert report["metrics"]["n_generated"] == 6 and report["samples"]["labels"] == labels
    assert report["samples"]["model"]["result"]["name"] == "final"

    # a rerun samples nothing; another setting in the same folder is refused by name
    assert cli(_argv(final, gen, ref)) == 0
    assert cli(_argv(final, gen, ref, "--cfg", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cfg: 1.5 there, 3.0 now" in err and "--overwrite" in err


def test_unseen_and_missing_classes_are_named(tmp_path, capsys):
    data = _write(tmp_path / "data", ["1", "2", "10"], [4, 4, 4])
    train(tiny_config(data, tmp_path / "run", "lora", train={"max_steps": 1}))
    final = tmp_path / "run" / "final"
    extra = _write(tmp_path / "t1", ["1", "2", "10", "102"], [1, 1, 1, 1])
    capsys.readouterr()
    assert cli(_argv(final, tmp_path / "g1", extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "['102'] are not among the 3 classes" in err and len(err.splitlines()) == 1
    short = _write(tmp_path / "t2", ["1", "10"], [1, 1])
    assert cli(_argv(final, tmp_path / "g2", short)) == 2
    assert "class(es) ['2'] that" in capsys.readouterr().err
    assert not (tmp_path / "g1").exists() and not (tmp_path / "g2").exists()  # refused before any sampling


def test_ranges_are_checked_before_any_work(tmp_path, capsys):
    ref = _write(tmp_path / "ref", ["a", "b"], [2, 2])
    base = ["eval-class", "--generated", str(ref), "--reference", str(ref), "--extractor", "random"]
    for flag, value in (("--k", "0"), ("--batch-size", "0")):
        assert cli([*base, flag, value]) == 2
        assert f"{flag} must be at least 1, got {value}" in capsys.readouterr().err
    assert cli([*base, "--k", "4"]) == 2  # 4 images per set: k must be below that
    assert "--k 4 needs more than 4 images in each set, but --reference has 4" in capsys.readouterr().err
    gen = ["--model", "var", "--vae-ckpt", str(ref / "a" / "0.png"), "--var-ckpt", str(ref / "a" / "1.png")]
    for flag, value in (("--gen-batch-size", "0"), ("--per-class", "0")):
        assert cli([*base[:2], str(tmp_path / "g"), *base[3:], *gen, flag, value]) == 2
        assert f"{flag} must be at least 1, got {value}" in capsys.readouterr().err
    help_text = " ".join(_parser().format_help().split())
    assert "integer name is its ImageNet label" in help_text and "matched by name" in help_text


def _parser():
    import argparse

    from arbooth.commands import eval_class
    p = argparse.ArgumentParser()
    eval_class.add_arguments(p)
    return p

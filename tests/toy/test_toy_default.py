"""The built-in default: a CI-sized personalization of the shipped toy base on the demo subject.

Asserts that the recipe works, not only that it runs (issue 13's targets): the base draws the class
it is asked for and not the subject; after personalization the oracle sees the whole subject in most
<S*> samples, on the asked backgrounds, while the plain class prompt does not turn into the subject.
The margins over the targets exceed the spread across training seeds (docs/toy.md).
"""
import statistics
from pathlib import Path

import pytest
import torch

from arbooth.config import load_config
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.toy.models import TOY_DIR, read_manifest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not (TOY_DIR / "toy.json").is_file(), reason="toy base not built")


def test_shipped_toy_base_matches_its_hashes_and_size_budget():
    manifest = read_manifest(TOY_DIR)  # raises on any sha256 mismatch
    total = sum((TOY_DIR / f).stat().st_size for f in manifest["sha256"])
    assert total < 20 * 2**20 and "infinity.safetensors" in manifest["sha256"]


@pytest.fixture
def one_thread():
    # the toy model's ops are tiny: two threads gain nothing idle and are ~5x slower on a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_toy_personalization_learns_the_subject_and_keeps_the_prior(tmp_path, one_thread):
    from arbooth.recipes.train_subject import train
    from arbooth.toy.report import toy_report
    cfg = load_config(SubjectTrainConfig, ROOT / "configs" / "subject" / "toy.yaml",
                      [f"subject={ROOT / 'subjects' / 'toy_star'}", f"out_dir={tmp_path}"])
    path = train(cfg)
    m = toy_report(cfg.subject, path, tmp_path, seeds=(0, 1, 2), guidance=cfg.validation_guidance, tau=cfg.validation_tau, grid=False)
    base, pers = m["base"]["mean"], m["personalized"]["mean"]
    # issue 13's targets, each with a margin over the spread across training seeds (docs/toy.md ablation)
    # the base draws the asked class and does not already draw the subject (its appearance was held out)
    assert base["class_shape_acc"] >= 0.8 and base["subject_acc"] <= 0.25 and base["background_acc"] >= 0.8, base
    # after personalization: the whole subject (star, green, split, yellow top) on the asked backgrounds,
    # and the plain class prompt does not turn into the subject
    assert pers["subject_acc"] >= 0.7 and pers["subject_acc"] >= base["subject_acc"] + 0.5, pers
    assert pers["background_acc"] >= 0.8 and pers["class_subject_leak"] <= 0.1, pers
    gain = pers["I_ID"] - base["I_ID"]
    spread = max(statistics.stdev(m["base"]["I_ID_per_seed"]), statistics.stdev(m["personalized"]["I_ID_per_seed"]))
    assert gain > spread and gain > 0.1, (gain, spread)


def test_no_argument_train_subject_is_the_toy_default(tmp_path, monkeypatch):
    import argparse

    from arbooth.commands import train_subject as cmd
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    monkeypatch.chdir(tmp_path)  # not the repo root: the demo subject is still found
    cfg = cmd.build_config(parser.parse_args([]))
    assert cfg.model.preset == "toy" and Path(cfg.subject) == ROOT / "subjects" / "toy_star"
    assert cfg.loss.weights_for(5) == (1.0, 1.0, 1.0, 0.5, 0.5) and cfg.loss.prior
    assert cmd.build_config(parser.parse_args(["--tiny", "--subject", "x"])).model.preset == "tiny"

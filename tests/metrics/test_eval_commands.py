"""eval-class and eval-subject end to end on tiny folders, with random-weight extractors."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from arbooth.cli import main as cli_main
from arbooth.commands.eval_class import (
    class_counts,
    class_keys,
    class_labels,
    extract_features,
    generate_class_samples,
    imagenet_labels,
)
from arbooth.commands.eval_subject import (
    generate_subject_samples,
    generated_groups,
    load_subject_generator,
    read_templates,
)
from arbooth.errors import ArboothError
from arbooth.metrics.extractors import TinyFIDNet
from arbooth.metrics.report import RANDOM_WEIGHTS_NOTE
from arbooth.sample_folder import SampleFolder


def _write_pngs(folder, n, seed, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_eval_class_end_to_end_with_cache(tmp_path, capsys):
    ref = tmp_path / "ref"
    for c in range(2):
        _write_pngs(ref / f"class{c}", 6, seed=c)
    gen = tmp_path / "gen"
    shutil.copytree(ref, gen)  # generated == reference: FID ~ 0, precision = recall = 1
    cache = tmp_path / "cache"
    argv = ["eval-class", "--generated", str(gen), "--reference", str(ref), "--random-weights",
            "--cache-dir", str(cache), "--device", "cpu", "--batch-size", "4"]
    assert cli_main(argv) == 0
    assert RANDOM_WEIGHTS_NOTE in capsys.readouterr().out
    report = json.loads((gen / "eval_class" / "eval_class.json").read_text())
    m = report["metrics"]
    assert abs(m["FID"]) < 1e-3 and m["precision"] == m["recall"] == 1.0
    assert m["n_generated"] == m["n_reference"] == 12 and report["random_weights"]
    # issue 18.5: 12 samples of 64-d features: warned and recorded next to the numbers
    assert m["feature_dim"] == 64 and m["fid_fewer_samples_than_dims"] is True
    assert "12 and 12 samples with 64-dimensional features" in report["warnings"][0]
    assert (gen / "eval_class" / "eval_class.md").read_text().startswith("# eval-class")
    assert len(list(cache.glob("*.npz"))) == 1
    # A second run reuses the cached reference features; changing the reference changes the key.
    assert cli_main(argv) == 0
    assert len(list(cache.glob("*.npz"))) == 1
    _write_pngs(ref / "class1", 1, seed=9)  # overwrites 000.png
    assert cli_main(argv) == 0
    assert len(list(cache.glob("*.npz"))) == 2
    assert json.loads((gen / "eval_class" / "eval_class.json").read_text())["metrics"]["FID"] > 1e-3


def test_class_sampling_is_resumable(tmp_path):
    ref = tmp_path / "ref"
    _write_pngs(ref / "0000", 3, 0)
    _write_pngs(ref / "0001", 2, 1)
    assert class_counts(ref) == {"0000": 3, "0001": 2}
    counts = class_labels(class_counts(ref))
    assert counts == {0: 3, 1: 2}
    with pytest.raises(ArboothError, match="integer ImageNet label"):  # by name, never by position
        class_labels({"daisy": 2})
    with pytest.raises(ArboothError, match=r"\['1000'\] name no ImageNet class"):
        imagenet_labels(["0207", "1000"])
    calls = []

    def generate(labels_B, seeds):  # a deterministic stand-in with the VAR generate() contract (seed per image)
        calls.append((labels_B.tolist(), list(seeds)))
        return torch.stack([torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])

    folder = SampleFolder(tmp_path / "gen", {"model": "stand-in"})
    jobs = class_keys(imagenet_labels(["0000", "0001"]), class_counts(ref), seed=10)
    assert generate_class_samples(generate, jobs, folder, batch_size=2) == 5
    assert calls == [([0, 0], [10, 11]), ([0, 1], [12, 13]), ([1], [14])]  # image k uses seed + k
    recs = folder.records()
    assert [(r["prompt"], r["label"], r["seed"]) for r in recs] == [("0000", 0, 10), ("0000", 0, 11), ("0000", 0, 12),
                                                                    ("0001", 1, 13), ("0001", 1, 14)]
    recs[-1]["path"].unlink()
    assert generate_class_samples(generate, jobs, folder, batch_size=2) == 1
    assert calls[3:] == [([1], [14])]  # only the missing image, with its own seed
    assert len(folder.records()) == 5


def test_eval_class_var_model_needs_checkpoints(tmp_path):
    pytest.importorskip("arbooth.models.var_loading")
    _write_pngs(tmp_path / "ref" / "0000", 2, 0)
    with pytest.raises(ArboothError, match="vae-ckpt"):
        import argparse

        from arbooth.commands import eval_class
        p = argparse.ArgumentParser()
        eval_class.add_arguments(p)
        eval_class.main(p.parse_args(["--generated", str(tmp_path / "g"), "--reference", str(tmp_path / "ref"),
                                      "--model", "var", "--random-weights"]))


def test_eval_reading_over_bad_inputs(bad_inputs_dir):
    skipped = {}
    feats = extract_features(bad_inputs_dir, TinyFIDNet(dim=8), torch.device("cpu"), 4, skipped, "bad")
    names = {p.split("/")[-1] for p in skipped}
    # Per bad_inputs/README.md: corrupt, empty and non-image files and the bomb are skipped, named.
    assert {"truncated.jpg", "zero_bytes.png", "not_an_image.jpg", "bomb_40000x40000.png"} <= names
    assert all(name in skipped[k] for k in skipped for name in [k.split("/")[-1]])
    assert "notes.txt" not in names and not any(n.startswith(".") for n in names)  # ignored, not skipped
    readable = {"ok_rgb.jpg", "ok_rgb.webp", "grayscale.png", "palette.png", "rgba_with_alpha.png", "cmyk.jpg",
                "sixteen_bit_gray.png", "exif_rotated.jpg", "extreme_aspect.jpg", "tiny_8x8.png", "animated.gif"}
    assert feats["pool"].shape[0] == len(readable) and np.isfinite(feats["pool"]).all()


@pytest.fixture(scope="module")
def subject_dirs(tmp_path_factory, toy_subject_dir):
    root = tmp_path_factory.mktemp("subj")
    subject = root / "subject"
    subject.mkdir()
    for p in sorted(toy_subject_dir.glob("*.png"))[:2]:
        Image.open(p).convert("RGB").resize((96, 96)).save(subject / f"{p.stem}.png")
    prompts = root / "prompts.txt"
    prompts.write_text("a {} in the jungle\na {} in the snow\n")
    return root, subject, prompts


def test_eval_subject_end_to_end(subject_dirs, bad_inputs_dir, capsys):
    root, subject, prompts = subject_dirs
    gen = root / "gen"
    for i in range(2):  # ARBooth layout: prompt_XX folders; copies of the subject photos
        shutil.copytree(subject, gen / f"prompt_{i:02d}")
    shutil.copy(bad_inputs_dir / "truncated.jpg", gen / "prompt_01" / "truncated.jpg")
    cls = root / "class_images"
    _write_pngs(cls, 2, seed=3, size=64)
    argv = ["eval-subject", "--generated", str(gen), "--subject", str(subject), "--class-noun", "vase",
            "--prompts", str(prompts), "--class-images", str(cls), "--random-weights", "--device", "cpu",
            "--protocol", "dreambooth"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "protocol: dreambooth" in out and RANDOM_WEIGHTS_NOTE in out
    report = json.loads((gen / "eval_subject" / "eval_subject.json").read_text())
    assert report["protocol"] == "dreambooth" and report["t_clip_text"] == "prompt with class noun"
    rows = report["per_prompt"]
    assert [r["prompt"] for r in rows] == ["a {} in the jungle", "a {} in the snow"]
    assert all(r["n_images"] == 2 for r in rows)
    # Generated = the subject set itself: same mean pairwise similarity for every prompt.
    assert rows[0]["I_DINO"] == pytest.approx(rows[1]["I_DINO"], abs=1e-9)
    avg = report["average"]
    assert {"I_DINO", "I_CLIP", "T_CLIP", "DIV", "PRES"} <= set(avg) and avg["n_images"] == 4
    assert any(k.endswith("truncated.jpg") for k in report["skipped"])
    assert (gen / "eval_subject" / "eval_subject.md").is_file()


def test_subject_sampling_hook_and_manifest_layout(subject_dirs):
    root, subject, prompts = subject_dirs
    seen = []

    def generator(text, seed):  # the SubjectGenerator contract the ARBooth sampler will implement
        seen.append((text, seed))
        return Image.open(sorted(subject.iterdir())[seed % 2])

    gen = root / "gen_manifest"
    templates = prompts.read_text().splitlines()
    folder = SampleFolder(gen, {"model": "stand-in"})
    assert generate_subject_samples(generator, templates, "<sks> vase", folder, n_per_prompt=2, seed=5) == 4
    assert seen[0] == ("a <sks> vase in the jungle", 5) and seen[1][1] == 6
    assert generate_subject_samples(generator, templates, "<sks> vase", folder, n_per_prompt=2, seed=5) == 0
    groups = generated_groups(gen, templates)
    assert [t for t, _ in groups] == templates
    assert groups[1][1] == [folder.path_for(templates[1], 5), folder.path_for(templates[1], 6)]
    assert folder.records()[0]["text"] == "a <sks> vase in the jungle"
    # the real generator (tests/recipes/test_subject_sampling.py) refuses a missing file in one line
    with pytest.raises(ArboothError, match="personalization file not found"):
        load_subject_generator(root / "model.pth", "cpu")


def test_eval_subject_prompt_file_errors(subject_dirs, tmp_path):
    root, subject, _ = subject_dirs
    bad = tmp_path / "p.txt"
    bad.write_text("a photo of a dog\n")
    rc = cli_main(["eval-subject", "--generated", str(root), "--subject", str(subject), "--class-noun", "dog",
                   "--prompts", str(bad), "--random-weights"])
    assert rc == 2


def test_live_object_prompt_split(tmp_path):
    (tmp_path / "live.txt").write_text("a {} sleeping\na {} running in the park\n")
    (tmp_path / "objects.txt").write_text("a {} on a table\n\na {} in the snow\n")
    args = argparse.Namespace(prompts=None, live_prompts=tmp_path / "live.txt",
                              object_prompts=tmp_path / "objects.txt", live=True)
    live = read_templates(args)
    args.live = False
    objects = read_templates(args)
    assert live != objects and all("{}" in t for t in live + objects)
    args.object_prompts = None
    with pytest.raises(ArboothError, match="--prompts"):
        read_templates(args)


def test_eval_class_missing_folder_is_named_before_any_model_loads(tmp_path, capsys):
    from arbooth.cli import main as cli

    assert cli(["eval-class", "--generated", str(tmp_path / "nope"), "--reference", str(tmp_path)]) == 2
    assert "--generated folder not found" in capsys.readouterr().err

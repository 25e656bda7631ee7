"""From a personalization file to images and scores: `arbooth generate --personalization` and
`arbooth eval-subject --model` on the shipped toy base (a 2-step personalization, CPU, seconds)."""
import json
from pathlib import Path

import pytest
import torch

from arbooth.cli import main as cli
from arbooth.config import load_config
from arbooth.data.images import pil_to_tensor_m11, read_image
from arbooth.errors import CheckpointError, ConfigError
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_subject import train
from arbooth.sample_folder import SampleFolder, file_sha256
from arbooth.subject_bases import load_sampler

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def personalization(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy_run")
    cfg = load_config(SubjectTrainConfig, ROOT / "configs" / "subject" / "toy.yaml",
                      [f"subject={ROOT / 'subjects' / 'toy_star'}", f"out_dir={out}", "steps=2"])
    return train(cfg)


def test_sampler_applies_the_personalization(personalization):
    sampler = load_sampler(personalization)
    params = dict(sampler.model.named_parameters())
    assert sampler.personalization.tensors  # something was tuned
    for name, value in sampler.personalization.tensors.items():
        assert torch.equal(params[name].detach(), value.to(params[name].dtype)), name
    assert sampler.class_noun == "star"
    a = sampler.generate(["a <S*> star on a red background"], seed=3)
    assert a.shape[0] == 1 and torch.equal(a, sampler.generate(["a <S*> star on a red background"], seed=3))


def test_generate_cli_with_personalization(personalization, tmp_path):
    prompt = "a <S*> star on a blue background"
    rc = cli(["generate", "--personalization", str(personalization), "--prompt", prompt, "--n", "2",
              "--seed", "5", "--out", str(tmp_path / "s.png"), "--device", "cpu"])
    assert rc == 0 and (tmp_path / "s.png").is_file()
    expected = load_sampler(personalization).generate([prompt], seed=[6])  # image 1: seed + 1
    got = pil_to_tensor_m11(read_image(tmp_path / "s_001.png")).add(1).div(2)
    assert (got - expected[0]).abs().max() <= 1 / 255 + 1e-6  # same seed, same image as the Python API


def test_generate_cli_refuses_a_different_base(personalization, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_sampler(tmp_path / "missing.safetensors")
    assert cli(["generate", "--prompt", "a star", "--out", str(tmp_path / "x.png")]) == 2  # no model given


def test_eval_subject_samples_from_the_personalization(personalization, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} on a red background\na small {}\n")
    gen = tmp_path / "gen"
    rc = cli(["eval-subject", "--model", str(personalization), "--generated", str(gen),
              "--subject", str(ROOT / "subjects" / "toy_star"), "--class-noun", "star", "--prompts", str(prompts),
              "--images-per-prompt", "2", "--pres-samples", "2", "--random-weights", "--device", "cpu",
              "--batch-size", "4"])
    assert rc == 0
    records = SampleFolder.open(gen).records()
    assert len(records) == 6 and {r["text"] for r in records} == {"a <S*> star on a red background",
                                                                  "a small <S*> star", "a photo of star"}
    report = json.loads((gen / "eval_subject" / "eval_subject.json").read_text())
    assert report["average"]["n_images"] == 4 and report["average"]["PRES"] is not None


def test_batched_images_follow_their_own_seeds(personalization):
    """eval-subject samples several seeds in one batch: image i must be the image of seed i alone."""
    sampler = load_sampler(personalization)
    prompt = "a <S*> star on a red background"
    batch = sampler.generate([prompt] * 3, seed=[7, 8, 9])
    for i, seed in enumerate((7, 8, 9)):
        alone = sampler.generate([prompt], seed=[seed])[0]
        assert (batch[i] - alone).abs().max() < 1e-4, f"seed {seed}"
    assert not torch.equal(batch[0], batch[1])  # different seeds, different images
    images = sampler.images(prompt, [8, 9])
    assert (pil_to_tensor_m11(images[1]).add(1).div(2) - batch[2]).abs().max() <= 1 / 255 + 1e-6
    with pytest.raises(ConfigError, match="2 seeds for 3 prompts"):
        sampler.generate([prompt] * 3, seed=[1, 2])


def test_eval_subject_generation_batches_keep_the_seeds(personalization, tmp_path):
    from arbooth.commands.eval_subject import generate_class_samples, generate_subject_samples

    sampler = load_sampler(personalization)
    calls = []

    class Recording:
        def __call__(self, text, seed):
            return sampler(text, seed)

        def images(self, text, seeds):
            calls.append(list(seeds))
            return sampler.images(text, seeds)

    gen = SampleFolder(tmp_path / "gen", {"model": "toy"})
    assert generate_subject_samples(Recording(), ["a {}"], "<S*> star", gen, n_per_prompt=5, seed=2,
                                    batch_size=2) == 5
    assert calls == [[2, 3], [4, 5], [6]]
    one = pil_to_tensor_m11(read_image(gen.path_for("a {}", 5)))
    assert (one - pil_to_tensor_m11(sampler("a <S*> star", 5))).abs().max() <= 2 / 255 + 1e-6
    gen.path_for("a {}", 3).unlink()  # resumable: only the missing image is sampled again
    calls.clear()
    assert generate_subject_samples(Recording(), ["a {}"], "<S*> star", gen, n_per_prompt=5, seed=2,
                                    batch_size=2) == 1
    assert calls == [[3]] and len(gen.records()) == 5
    paths = generate_class_samples(Recording(), "star", gen, n=3, seed=0, batch_size=4)
    assert calls[-1] == [0, 1, 2] and len(paths) == 3 and all(p.is_file() for p in paths)


def _pixels(path):
    import numpy as np
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_same_seed_same_images_at_batch_sizes_1_and_4(personalization, tmp_path):
    """Issue 19.1: images differed by up to 205/255 between --batch-size 1, 2 and 4. Right: image k from
    seed + k alone; equal up to the rounding of batched float noise (at most 1 grey level)."""
    prompt = "a <S*> star on the beach"
    for bs in (1, 4):
        assert cli(["generate", "--personalization", str(personalization), "--prompt", prompt, "--n", "4",
                    "--seed", "0", "--batch-size", str(bs), "--out", str(tmp_path / f"b{bs}" / "s.png"),
                    "--device", "cpu"]) == 0
    for k in range(4):
        a, b = _pixels(tmp_path / "b1" / f"s_{k:03d}.png"), _pixels(tmp_path / "b4" / f"s_{k:03d}.png")
        assert abs(a - b).max() <= 1, k
    assert abs(_pixels(tmp_path / "b1" / "s_000.png") - _pixels(tmp_path / "b1" / "s_001.png")).max() > 20
    expected = load_sampler(personalization).generate([prompt], seed=[2])[0]  # image 2: seed 2
    got = pil_to_tensor_m11(read_image(tmp_path / "b4" / "s_002.png")).add(1).div(2)
    assert (got - expected).abs().max() <= 1 / 255 + 1e-6


def test_generate_out_of_range_arguments_are_one_line(personalization, tmp_path, capsys):
    """Issue 19.4: --top-p -0.5 --top-k -3 exited 0 with unfiltered sampling."""
    for args, msg in ((["--top-p", "-0.5", "--top-k", "-3"], "top_k must be an integer >= 0"),
                      (["--top-p", "1.5"], "top_p must be in [0, 1]"), (["--tau", "0"], "tau must be"),
                      (["--cfg", "4,-1"], "cfg must be")):
        capsys.readouterr()
        assert cli(["generate", "--personalization", str(personalization), "--prompt", "a <S*> star",
                    "--out", str(tmp_path / "x.png"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    sampler = load_sampler(personalization)
    with pytest.raises(ConfigError, match="top_p must be in"):  # the Python API too
        sampler.generate(["a <S*> star"], top_p=1.5)
    assert not (tmp_path / "x.png").exists()


def test_generate_outputs_checked_before_loading(personalization, tmp_path, capsys):
    """Issue 19.2/19.3: a bad --out is one line before any model loads (a missing personalization file
    is not even opened), and --out may not be one of the inputs."""
    (tmp_path / "file.png").write_bytes(b"x")
    missing = str(tmp_path / "missing.safetensors")
    cases = [(missing, str(tmp_path / "file.png" / "s.png"), "is a file, not a folder")]
    if Path("/dev/full").exists():
        cases.append((missing, "/dev/full", "not a regular file"))
    copy = tmp_path / "pers.png"  # a personalization file named like an image
    copy.write_bytes(Path(personalization).read_bytes())
    cases.append((str(copy), str(copy), "would overwrite the input"))
    for pers, out, msg in cases:
        capsys.readouterr()
        assert cli(["generate", "--personalization", pers, "--prompt", "a <S*> star", "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.png", "pers.png"]
    assert copy.read_bytes() == Path(personalization).read_bytes()


def test_damaged_personalization_metadata_is_one_line(personalization, tmp_path, capsys):
    """Issue 19.5: invalid JSON in `config` gave a JSONDecodeError traceback; a missing key an unrelated
    message about checkpoints. Right: one line naming the file and what is wrong."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(personalization), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    bad_json = tmp_path / "bad_json.safetensors"
    save_file(tensors, str(bad_json), metadata={**meta, "config": "{not json"})
    no_config = tmp_path / "no_config.safetensors"
    save_file(tensors, str(no_config), metadata={k: v for k, v in meta.items() if k != "config"})
    for path, msg in ((bad_json, "'config' metadata is not valid JSON"), (no_config, "has no 'config' entry")):
        capsys.readouterr()
        assert cli(["generate", "--personalization", str(path), "--prompt", "a <S*> star",
                    "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert str(path) in err and msg in err and "\n" not in err, err
        with pytest.raises(CheckpointError, match=msg):
            load_sampler(path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {}\n")
    capsys.readouterr()
    assert cli(["eval-subject", "--model", str(bad_json), "--generated", str(tmp_path / "gen"), "--subject",
                str(ROOT / "subjects" / "toy_star"), "--class-noun", "star", "--prompts", str(prompts),
                "--random-weights", "--device", "cpu"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_generate_refuses_a_prompt_whose_placeholder_is_cut_off(personalization, tmp_path, capsys):
    """Issue 18.6 through the CLI: the toy text length is 24 (21 tokens fit beside a 4-row <S*>)."""
    long_prompt = " ".join(["a"] * 30 + ["<S*>", "star"])
    assert cli(["generate", "--personalization", str(personalization), "--prompt", long_prompt,
                "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress bars come before the error line
    assert "which removes <S*>" in err[-1] and err[-1].startswith("arbooth generate: error:"), err
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "x.png").exists()


def _eval_args(model, gen, prompts, *extra):
    import argparse

    from arbooth.commands import eval_subject
    p = argparse.ArgumentParser()
    eval_subject.add_arguments(p)
    return p.parse_args(["--model", str(model), "--generated", str(gen), "--subject", str(ROOT / "subjects" / "toy_star"),
                         "--class-noun", "star", "--prompts", str(prompts), "--images-per-prompt", "2",
                         "--pres-samples", "1", "--device", "cpu", *extra])


def test_eval_subject_sample_folder_is_never_stale(personalization, tmp_path_factory, tmp_path, capsys):
    """Issue 24: model B into model A's folder sampled nothing and reported A's images as B's; a deleted
    image was appended a second time and counted twice. Now: refused by name (or resampled with
    --overwrite); the deleted image is sampled once and counted once; another prompt list is refused."""
    from arbooth.commands.eval_subject import _sample_first

    out_b = tmp_path_factory.mktemp("toy_run_b")
    cfg_b = load_config(SubjectTrainConfig, ROOT / "configs" / "subject" / "toy.yaml",
                        [f"subject={ROOT / 'subjects' / 'toy_star'}", f"out_dir={out_b}", "steps=1"])
    model_b = train(cfg_b)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} on a red background\na small {}\n")
    gen = tmp_path / "gen"
    templates = prompts.read_text().splitlines()
    groups, pres, identity = _sample_first(_eval_args(personalization, gen, prompts), templates, "cpu")
    assert [len(files) for _, files in groups] == [2, 2] and len(pres) == 1
    assert identity["model"]["name"] == personalization.name and str(personalization.parent) not in str(identity)
    hashes_a = {p.read_bytes() for _, files in groups for p in files}

    # model B into A's folder: one line naming the model, exit 2, before any model loads
    def argv(model, prompt_file):
        return ["eval-subject", "--model", str(model), "--generated", str(gen), "--subject",
                str(ROOT / "subjects" / "toy_star"), "--class-noun", "star", "--prompts", str(prompt_file),
                "--random-weights", "--device", "cpu"]

    assert cli(argv(model_b, prompts)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (training B printed progress bars before)
    sha_a, sha_b = identity["model"]["sha256"][:12], file_sha256(model_b)[:12]
    assert f"model: {personalization.name}@{sha_a} there, {model_b.name}@{sha_b} now" in err, err
    assert "--overwrite" in err and "prompts" not in err
    # another prompt list, same model: refused by name
    prompts2 = tmp_path / "prompts2.txt"
    prompts2.write_text("a {} on a red background\n")
    assert cli(argv(personalization, prompts2)) == 2
    err = capsys.readouterr().err
    assert "prompts:" in err and "model:" not in err

    # a deleted image of A: sampled once more, counted once
    victim = groups[1][1][0]
    before = _pixels(victim)
    victim.unlink()
    groups2, _, _ = _sample_first(_eval_args(personalization, gen, prompts), templates, "cpu")
    assert [len(files) for _, files in groups2] == [2, 2] and victim.is_file()
    # the same seed, the same image (up to the rounding of batched noise: it was sampled in a batch of 2)
    assert abs(_pixels(victim) - before).max() <= 2
    assert len(SampleFolder.open(gen).records()) == 5  # 4 subject images + 1 PRES image, one record each

    # --overwrite: B's own images, never A's
    groups_b, _, identity_b = _sample_first(_eval_args(model_b, gen, prompts, "--overwrite"), templates, "cpu")
    assert identity_b["model"]["name"] == model_b.name and [len(f) for _, f in groups_b] == [2, 2]
    assert not {p.read_bytes() for _, files in groups_b for p in files} & hashes_a


def test_eval_subject_ranges_are_checked_before_any_work(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {}\n")
    base = ["eval-subject", "--model", str(tmp_path / "missing.safetensors"), "--generated", str(tmp_path / "g"),
            "--subject", str(tmp_path), "--class-noun", "star", "--prompts", str(prompts)]
    for flag, value, rule in (("--images-per-prompt", "0", "at least 1"), ("--gen-batch-size", "0", "at least 1"),
                              ("--batch-size", "0", "at least 1"), ("--pres-samples", "-1", "at least 0")):
        assert cli([*base, flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{flag} must be {rule}, got {value}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "g").exists()


# ------------------------------------------------------------------ issue 28 kinds 6 and 7
def _gen(personalization, tmp_path, name, *extra):
    return cli(["generate", "--personalization", str(personalization), "--prompt", "a <S*> star on a red background",
                "--seed", "2", "--out", str(tmp_path / name), "--device", "cpu", *extra])


def test_generate_with_a_personalization_honours_or_refuses_every_option(personalization, tmp_path, capsys):
    """Kind 6: --next-scale-mode area, --no-cache, --h-div-w/--pn, --model-kwargs were accepted and ignored."""
    assert _gen(personalization, tmp_path, "default.png") == 0
    assert _gen(personalization, tmp_path, "area.png", "--next-scale-mode", "area") == 0
    assert _gen(personalization, tmp_path, "nocache.png", "--no-cache") == 0
    default, area, nocache = (read_image(tmp_path / n) for n in ("default.png", "area.png", "nocache.png"))
    assert default.tobytes() != area.tobytes()  # the option acts
    expected = load_sampler(personalization).generate(["a <S*> star on a red background"], seed=[2],
                                                      next_scale_mode="area")
    got = pil_to_tensor_m11(area).add(1).div(2)
    assert (got - expected[0]).abs().max() <= 1 / 255 + 1e-6
    assert nocache.tobytes() == default.tobytes()  # the KV cache changes speed, not the images
    capsys.readouterr()
    for flags in (["--h-div-w", "0.5"], ["--pn", "0.06M"], ["--model-kwargs", "{}"], ["--vae-kwargs", "{}"],
                  ["--lvl-embed-every-chunk"]):
        assert _gen(personalization, tmp_path, "refused.png", *flags) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flags[0] in err[0] and "cannot be used with --personalization" in err[0]
    assert not (tmp_path / "refused.png").exists()


def test_generate_and_sample_check_ranges_and_placeholders_before_work(tmp_path, capsys):
    """Kind 7: a prompt naming <S*> without a personalization was accepted without a word; a zero aspect
    ratio, negative classes and options the chosen VAR ignores are refused in one line too."""
    cases = [
        (["generate", "--prompt", "a <S*> dog", "--model-ckpt", "m.pth", "--vae-ckpt", "v.pth"],
         "names <S*>, but no --personalization"),
        (["generate", "--prompt", "a dog", "--h-div-w", "0"], "--h-div-w must be a finite number > 0"),
        (["sample", "--tiny", "--classes", "-1"], "--classes must be >= 0"),
        (["sample", "--tiny", "--depth", "20"], "--depth cannot be used with --tiny"),
        (["sample", "--tiny", "--var-ckpt", "x.pth"], "--tiny builds a random model"),
        (["sample", "--result", str(tmp_path), "--depth", "16"], "--depth cannot be used with --result"),
    ]
    for args, message in cases:
        assert cli([*args, "--out", str(tmp_path / "x.png")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "x.png").exists()

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
from arbooth.recipes.train_subject import load_sampler, train

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
    expected = load_sampler(personalization).generate([prompt, prompt], seed=5)
    got = pil_to_tensor_m11(read_image(tmp_path / "s_001.png")).add(1).div(2)
    assert (got - expected[1]).abs().max() <= 1 / 255 + 1e-6  # same seed, same image as the Python API


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
    manifest = [json.loads(line) for line in (gen / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 4 and manifest[0]["text"] == "a <S*> star on a red background"
    assert len(list((gen / "class_prompt").glob("*.png"))) == 2
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

    gen = tmp_path / "gen"
    assert generate_subject_samples(Recording(), ["a {}"], "<S*> star", gen, n_per_prompt=5, seed=2,
                                    batch_size=2) == 5
    assert calls == [[2, 3], [4, 5], [6]]
    one = pil_to_tensor_m11(read_image(gen / "prompt_00" / "03.png"))
    assert (one - pil_to_tensor_m11(sampler("a <S*> star", 5))).abs().max() <= 2 / 255 + 1e-6
    (gen / "prompt_00" / "01.png").unlink()  # resumable: only the missing image is sampled again
    calls.clear()
    assert generate_subject_samples(Recording(), ["a {}"], "<S*> star", gen, n_per_prompt=5, seed=2,
                                    batch_size=2) == 1
    assert calls == [[3]]
    generate_class_samples(Recording(), "star", tmp_path / "cls", n=3, seed=0, batch_size=4)
    assert calls[-1] == [0, 1, 2] and len(list((tmp_path / "cls").glob("*.png"))) == 3

"""tuning.method=lora end to end on the shipped toy base (2 steps, CPU): train, save, reload, sample,
`generate --personalization`, `eval-subject --model`, merge export, refusal on a wrong base, resume,
the teacher bank."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from arbooth.adapt.personalization import load_personalization
from arbooth.cli import main as cli
from arbooth.config import load_config
from arbooth.errors import CheckpointError
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_subject import setup, train, train_step
from arbooth.subject_bases import build_base, load_sampler

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "configs" / "subject" / "toy.yaml"
SUBJECT = ROOT / "subjects" / "toy_star"
PROMPT = "a <S*> star on a red background"


def toy_config(out: Path, *overrides: str) -> SubjectTrainConfig:
    return load_config(SubjectTrainConfig, TOY, [f"subject={SUBJECT}", f"out_dir={out}", "steps=2",
                                                 "tuning.method=lora", "tuning.lora_rank=4", *overrides])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora_run")
    return train(toy_config(out, "tuning.lora_file_dtype=fp32"))


def test_lora_file_holds_only_adapters_and_the_token(lora_run):
    pers = load_personalization(lora_run)
    assert pers.kind == "lora" and pers.metadata["lora_rank"] == "4" and float(pers.metadata["lora_alpha"]) == 8.0
    assert pers.tensors and all(".lora_A." in k or ".lora_B." in k for k in pers.tensors)
    assert all(k.split(".")[2] in ("ca", "ffn") for k in pers.tensors)
    assert json.loads(pers.metadata["config"])["tuning"]["method"] == "lora" and pers.metadata["base_tuned_sha256"]
    assert any(v.abs().sum() > 0 for k, v in pers.tensors.items() if "lora_B" in k)  # trained away from B = 0
    assert pers.subject_token_PC.abs().sum() > 0


def test_reloaded_lora_samples_like_the_trained_model(lora_run, tmp_path):
    """The sampler rebuilds the base and injects the adapters: its logits equal the trained model's."""
    sampler = load_sampler(lora_run)
    run = setup(toy_config(tmp_path))  # a fresh run on the same base: put the file's adapters in
    with torch.no_grad():
        pers = load_personalization(lora_run)
        for k, p in run.tuner.params.items():
            p.copy_(pers.tensors[k])
    text, mask = sampler.personalization.encode(sampler.tokenizer, sampler.encoder, [PROMPT],
                                                max_length=sampler.model.text_maxlen)
    x = torch.randn(1, sum(h * w for _, h, w in sampler.schedule) - 1, run.vae.codebook_dim)
    run.model.eval()
    with torch.no_grad():
        expected = run.model(text, mask, x, run.schedule)
        got = sampler.model(text, mask, x, sampler.schedule)
    assert torch.allclose(got, expected, atol=1e-5)
    a = sampler.generate([PROMPT], seed=3)
    assert a.shape[0] == 1 and torch.equal(a, sampler.generate([PROMPT], seed=3))


def test_lora_refuses_a_different_base(lora_run):
    pers = load_personalization(lora_run)
    model = build_base(pers, lora_run).model
    with torch.no_grad():
        model.blocks[0].ffn.fc1.weight[0, 0] += 1.0  # another base model
    with pytest.raises(CheckpointError, match="different base model"):
        pers.apply(model)


def test_generate_eval_subject_and_export_take_a_lora_file(lora_run, tmp_path):
    rc = cli(["generate", "--personalization", str(lora_run), "--prompt", PROMPT, "--n", "1", "--seed", "5",
              "--out", str(tmp_path / "s.png"), "--device", "cpu"])
    assert rc == 0 and (tmp_path / "s.png").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} on a red background\n")
    gen = tmp_path / "gen"
    rc = cli(["eval-subject", "--model", str(lora_run), "--generated", str(gen), "--subject", str(SUBJECT),
              "--class-noun", "star", "--prompts", str(prompts), "--images-per-prompt", "1", "--pres-samples", "1",
              "--random-weights", "--device", "cpu"])
    assert rc == 0 and (gen / "eval_subject" / "eval_subject.json").is_file()
    # export: the merged full personalization gives the LoRA model's logits
    merged = tmp_path / "merged.safetensors"
    assert cli(["export", str(lora_run), "--merge", "--out", str(merged)]) == 0
    full = load_personalization(merged)
    assert full.kind == "full" and "blocks.0.ca.q.weight" in full.tensors and "blocks.0.ca.q.bias" in full.tensors
    assert json.loads(full.metadata["config"])["tuning"]["method"] == "full"
    a, b = load_sampler(lora_run), load_sampler(merged)
    text, mask = a.personalization.encode(a.tokenizer, a.encoder, [PROMPT], max_length=a.model.text_maxlen)
    x = torch.randn(1, sum(h * w for _, h, w in a.schedule) - 1, a.model.d)
    with torch.no_grad():
        assert torch.allclose(a.model(text, mask, x, a.schedule), b.model(text, mask, x, b.schedule), atol=1e-4)
    assert cli(["export", str(merged), "--merge", "--out", str(tmp_path / "again.safetensors")]) == 2  # not LoRA


def test_lora_resume_and_teacher_bank(tmp_path):
    out = tmp_path / "run"
    train(toy_config(out, "save_every=1", "teacher.bank_size=3"))
    first = load_personalization(out / "personalization")
    assert first.metadata["base_dtype"] == "float32"
    train(toy_config(out, "steps=3", "resume=true", "teacher.bank_size=3"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and all(m["distill"] >= 0 for m in lines)
    run = setup(toy_config(tmp_path / "bank", "teacher.bank_size=3"))
    assert run.bank[0].shape[0] == 3 and run.bank[1].shape[:2] == (3, run.bank[0].shape[1] + 1)
    seen: list[str] = []
    run.model.train()
    train_step(run, torch.arange(2), on_phase=seen.append)
    assert seen == ["instance", "instance_update", "distill", "update"]  # no teacher pass per step


def test_train_subject_script_runs_lora_on_the_builtin_default(tmp_path):
    """`python train_subject.py tuning.method=lora` (here with 2 steps)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "train_subject.py"), "tuning.method=lora", "steps=2",
                        f"out_dir={tmp_path / 'o'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LoRA r=16 alpha=32" in r.stderr and (tmp_path / "o" / "grid.png").is_file()
    assert load_personalization(tmp_path / "o" / "personalization").kind == "lora"
    assert ModelCard.load(tmp_path / "o" / "README.md").data.library_name == "arbooth"
    card = ModelCard.load(tmp_path / "o" / "personalization" / "README.md")
    assert "peft" in card.data.tags and "subject_acc" in card.text and (tmp_path / "o" / "personalization" / "grid.png").is_file()

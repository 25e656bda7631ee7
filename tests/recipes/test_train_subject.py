"""The ARBooth recipe end to end on a tiny random model (the real CLI in a subprocess), and its configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arbooth.adapt.personalization import load_personalization
from arbooth.config import load_config
from arbooth.errors import ConfigError
from arbooth.recipes.subject_config import SubjectTrainConfig

ROOT = Path(__file__).resolve().parents[2]


def test_configs_validate_without_building_a_model() -> None:
    cfg = load_config(SubjectTrainConfig, ROOT / "configs/subject/infinity_2b.yaml")
    assert cfg == SubjectTrainConfig()  # the YAML states the defaults, which are the authors'
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.steps, cfg.batch_size) == (2.34375e-5, 0.005, 500, 2)
    assert cfg.loss.weights_for(13) == (1.0,) * 8 + (0.5,) * 5 and cfg.loss.reg_lambda == 0.5
    assert cfg.tuning.text_prefix_length == 4 and (cfg.tuning.cross_attention, cfg.tuning.ffn) == (True, True)
    load_config(SubjectTrainConfig, ROOT / "configs/subject/tiny.yaml")
    with pytest.raises(ConfigError, match="lrr"):
        load_config(SubjectTrainConfig, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError):
        load_config(SubjectTrainConfig, None, ["teacher.mode=fast"])


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(ROOT / "train_subject.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_train_subject_end_to_end_tiny(toy_subject_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("--tiny", "--subject", str(toy_subject_dir), "--class-noun", "dog", "--out", str(out),
                "steps=2", "validate_every=2", "prompts.validation=['a {} on the beach']", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    pers = load_personalization(out / "personalization.safetensors")
    assert pers.subject_token_PC.shape == (4, 128) and pers.subject_token_PC.abs().sum() > 0  # moved from zeros
    assert all(k.split(".")[2] in ("ca", "ffn") for k in pers.tensors)
    assert json.loads(pers.metadata["config"])["steps"] == 2 and "tiny" in pers.metadata["base_model"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(m["distill"] >= 0 for m in lines)
    assert len(lines[0]["acc"]) == 7 and (out / "val/step_000002.png").is_file()
    # resume: continues from the saved state to 3 steps
    r = run_cli("--tiny", "--subject", str(toy_subject_dir), "--class-noun", "dog", "--out", str(out),
                "steps=3", "validate_every=0", "resume=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert not torch.equal(load_personalization(out / "personalization.safetensors").subject_token_PC,
                           pers.subject_token_PC)
    record = json.loads((out / "run.json").read_text())
    assert [(s["start_step"], s["end_step"]) for s in record["sessions"]] == [(0, 2), (2, 3)]
    # issue 18 cases 1 and 2 for train-subject: another run into the folder, or a resume with another lr
    args = ("--tiny", "--subject", str(toy_subject_dir), "--class-noun", "dog", "--out", str(out))
    r = run_cli(*args, "steps=4", cwd=tmp_path)
    assert r.returncode == 2 and "already holds a run" in r.stderr and "overwrite=true" in r.stderr
    r = run_cli(*args, "steps=4", "resume=true", "optim.lr=0.1", cwd=tmp_path)
    assert r.returncode == 2 and "optim.lr: 2.34375e-05 -> 0.1" in r.stderr
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_cli_errors_are_one_clear_line(bad_inputs_dir: Path, tmp_path: Path) -> None:
    r = run_cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "--class-noun" in r.stdout and "personalization" in r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("--tiny", "--subject", str(empty), "--class-noun", "dog", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "no readable image" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--subject", str(bad_inputs_dir), "--class-noun", "dog", cwd=tmp_path)
    assert r.returncode == 2 and "model.model_ckpt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("overrides, phases", [
    ([], ["teacher", "instance", "instance_update", "distill", "update"]),     # the authors' two updates
    (["optim.step_mode=combined"], ["teacher", "instance", "distill", "update"]),
    (["loss.prior=false"], ["instance", "update"]),
])
def test_train_step_reports_its_phases(overrides, phases, tmp_path) -> None:
    """The probe benchmarks/subject_memory.py takes per-phase memory peaks with."""
    from arbooth.recipes.train_subject import setup, train_step

    cfg = load_config(SubjectTrainConfig, ROOT / "configs/subject/toy.yaml",
                      [f"subject={ROOT / 'subjects/toy_star'}", f"out_dir={tmp_path}", *overrides])
    run = setup(cfg)
    run.model.train()
    seen: list[str] = []
    train_step(run, torch.arange(cfg.batch_size), on_phase=seen.append)
    assert seen == phases


def test_templates_and_outputs_checked_before_models_load(tmp_path, capsys):
    """Issue 18.7: `instance_template="a photo of {cls}"` trained <S*> never, `{tok}` ended in a KeyError
    traceback after the models loaded. Right: one-line ConfigError when the config loads. Checkpoint
    paths that do not exist prove the order: the template (or output) error comes first.
    Issue 19.3: an unwritable run folder (under a file) or one inside the subject's photos, likewise."""
    from arbooth.cli import main as cli

    subject = tmp_path / "subject"
    subject.mkdir()
    for p in (ROOT / "subjects" / "toy_star").iterdir():
        (subject / p.name).write_bytes(p.read_bytes())
    missing = ["--model-ckpt", str(tmp_path / "no.pth"), "--vae-ckpt", str(tmp_path / "no_vae.pth"),
               "--t5", str(tmp_path / "no_t5")]
    base = ["train-subject", "--subject", str(subject), "--class-noun", "star", *missing]
    (tmp_path / "file").write_bytes(b"x")
    cases = [(["prompts.instance_template=a photo of {cls}"], "instance_template: 'a photo of {cls}' must contain {token}"),
             (["prompts.instance_template=a photo of {tok} {cls}"], "unknown field(s) {tok}"),
             (["prompts.class_template=a photo of {token} {cls}"], "class_template"),
             (["prompts.validation=[a dog on the beach]"], "must contain {}"),
             (["--out", str(tmp_path / "file" / "run")], "file is a file, not a folder"),
             (["--out", str(subject / "run")], "overlaps the subject folder")]
    for extra, msg in cases:
        capsys.readouterr()
        assert cli([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err and "no.pth" not in err, err
    with pytest.raises(ConfigError, match="must contain"):
        load_config(SubjectTrainConfig, None, ["prompts.instance_template=a photo of {token}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "subject"] and not (subject / "run").exists()

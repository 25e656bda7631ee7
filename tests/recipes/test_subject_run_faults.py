"""Issue 28 on train-subject (the shipped toy base, a few steps, CPU): a resume never moves a run backwards
(kind 1), per-step logs are cut back to the resumed step (2) and the resumed run equals an uninterrupted
one bit for bit with bitwise self-correction on, a run holds its folder (5), and a full disk mid-save is
one line that leaves the personalization and its training state at the same step (9)."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from arbooth.config import load_config
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_subject import train
from arbooth.runs import LOCK_FILE, ResumeError, RunFolderError, hold_run_dir

ROOT = Path(__file__).resolve().parents[2]
FILES = ("personalization.safetensors", "train_state.pt", "run.json")


def _cfg(out: Path, *overrides: str) -> SubjectTrainConfig:
    # bsc.strength 0.3 (the default): the bit flips draw from their own generator, which a resume restores
    return load_config(SubjectTrainConfig, ROOT / "configs/subject/toy.yaml",
                       [f"subject={ROOT / 'subjects/toy_star'}", f"out_dir={out}", "bsc.strength=0.3", *overrides])


def _log(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "time_s"}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _step_of(out: Path) -> tuple[str, int]:
    with safe_open(str(out / "personalization.safetensors"), "pt") as f:
        pers = f.metadata()["step"]
    return pers, torch.load(out / "train_state.pt", weights_only=True)["step"]


def test_a_resume_never_moves_the_run_backwards(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_cfg(out, "steps=3"))
    before = {name: (out / name).read_bytes() for name in FILES}
    import arbooth.recipes.train_subject as recipe

    def no_models(*args, **kwargs):
        raise AssertionError("the refusal must come before the models load")

    monkeypatch.setattr(recipe, "setup", no_models)  # refused from run.json, before any weights load
    with pytest.raises(ResumeError, match="already reached step 3.*never moves a run backwards"):
        train(_cfg(out, "steps=2", "resume=true"))
    assert {name: (out / name).read_bytes() for name in FILES} == before  # nothing relabelled
    assert _step_of(out) == ("3", 3)


def test_resume_after_a_crash_logs_each_step_once_and_equals_the_uninterrupted_run(tmp_path):
    """Also the mutants 'bsc_generator left out of train_state.pt' and 'one batch draw fewer replayed':
    both change the resumed weights and losses."""
    full = tmp_path / "full"
    train(_cfg(full, "steps=4"))
    out = tmp_path / "split"
    train(_cfg(out, "steps=2"))
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in FILES:
        shutil.copy2(out / name, saved / name)
    train(_cfg(out, "steps=3", "resume=true"))
    for name in FILES:  # a crash after step 3 was logged, before it was saved: the state is step 2's
        shutil.copy2(saved / name, out / name)
    train(_cfg(out, "steps=4", "resume=true"))
    assert [m["step"] for m in _log(out)] == [1, 2, 3, 4]
    assert _log(out) == _log(full)  # losses and accuracies bit for bit
    a, b = _tensors(full / "personalization.safetensors"), _tensors(out / "personalization.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_holds_its_folder_and_a_crashed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    # another live run (this process) holds the folder
    with hold_run_dir(out, "train-subject"), \
            pytest.raises(RunFolderError, match=f"{out} is in use by another run .*pid {os.getpid()}"):
        train(_cfg(out, "steps=1"))
    assert not (out / "personalization.safetensors").exists() and not (out / LOCK_FILE).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now: a lock it left is stale
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "command": "x"}))
    train(_cfg(out, "steps=1"))
    assert (out / "personalization.safetensors").is_file() and not (out / LOCK_FILE).exists()


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_mid_save_is_one_line_and_the_files_still_agree(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "steps=2"))
    size = max((out / n).stat().st_size for n in FILES)
    # the personalization file (~2 MB) fits under the limit, the training state (~6 MB) does not
    args = [sys.executable, str(ROOT / "train_subject.py"), "--config", str(ROOT / "configs/subject/toy.yaml"),
            "--subject", str(ROOT / "subjects/toy_star"), "--out", str(out), "steps=3", "resume=true"]
    r = subprocess.run(args, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300, check=False,
                       preexec_fn=_limit_file_size(size // 2))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"in {out}" in err[-1] and "MB free" in err[-1] and "MB needed" in err[-1], err[-1]
    assert _step_of(out) == ("2", 2)
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".partial"))]


def test_the_lora_file_holds_the_adapters_in_bf16_by_default(tmp_path):
    """Mutant caught (issue 28): the LoRA file saved in fp32 although tuning.lora_file_dtype defaults to bf16;
    the training state keeps the fp32 values."""
    from arbooth.adapt.personalization import load_personalization

    out = tmp_path / "lora"
    path = train(_cfg(out, "steps=1", "tuning.method=lora", "tuning.lora_rank=4"))
    pers = load_personalization(path)
    assert pers.tensors and {v.dtype for v in pers.tensors.values()} == {torch.bfloat16}
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert {v.dtype for v in state["tuned"].values()} == {torch.float32}

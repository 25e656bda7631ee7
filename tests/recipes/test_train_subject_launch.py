"""train-subject under a launcher: several processes are refused in one line before any work (why: see
`check_single_process`), and a launcher's --mixed_precision that differs from the config is refused in
one line, as in train-class."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _class_tiny import tiny_config, write_dataset

from arbooth.cli import main as cli
from arbooth.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = ["train-subject", "--tiny", "--subject", str(ROOT / "subjects" / "toy_star"), "--class-noun", "star"]


@pytest.mark.slow
def test_two_processes_are_refused_in_one_line_before_any_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    # as tests/recipes/test_train_class_ddp.py: accelerate's torchrun launcher, gloo on a machine without CUDA
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
           str(ROOT / "train_subject.py"), *TINY[1:], f"out_dir={out}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("arbooth train-subject: error:")]
    assert len(errors) == 2 and "runs on one process (this launch has 2)" in errors[0], r.stderr[-3000:]
    assert not out.exists()


def test_launcher_precision_other_than_the_config_is_refused_in_both_trainers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert cli([*TINY, f"out_dir={tmp_path / 's'}"]) == 2  # --tiny trains in fp32
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mixed_precision bf16" in err[0] and "dtype=bf16" in err[0]
    assert not (tmp_path / "s").exists()
    from arbooth.recipes.train_class import train
    with pytest.raises(ConfigError, match="set train.precision=bf16"):
        train(tiny_config(write_dataset(tmp_path / "data"), tmp_path / "c", "lora"))
    assert not (tmp_path / "c").exists()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` sets when nothing was asked
    from arbooth.tracking import launcher_precision
    launcher_precision("bf16", "train.precision")

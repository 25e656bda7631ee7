"""A 2-process CPU (gloo) run through `accelerate launch` trains and ends with identical parameters."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _class_tiny import write_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_run_keeps_ranks_identical(tmp_path, method="lora"):
    data = write_dataset(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    # accelerate's `--cpu` multi-process launcher needs mpirun; `--multi_gpu` is its torchrun launcher,
    # and the recipe's Accelerator(cpu=True) then joins a gloo process group on a machine without CUDA.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517",
           str(Path(__file__).with_name("ddp_train_class_worker.py")), str(data), str(tmp_path), method]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["losses"] != r1["losses"]  # each rank saw its own shard of every batch
    assert r0["params"].keys() == r1["params"].keys() and r0["params"]
    for n, p in r0["params"].items():
        assert torch.equal(p, r1["params"][n]), n
    trained = [n for n, p in r0["params"].items() if "lora_B" in n or method == "fft"]
    assert any(r0["params"][n].abs().sum() > 0 for n in trained)
    assert (tmp_path / "run" / "final").is_dir()

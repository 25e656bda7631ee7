"""A 2-process CPU (gloo) run through `accelerate launch` trains and ends with identical parameters."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _class_tiny import global_batch_config, write_dataset

from arbooth.recipes.train_class import train

ROOT = Path(__file__).resolve().parents[2]


def _launch_two(data: Path, out: Path, method: str, *extra: str, port: int = 29517) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    # accelerate's `--cpu` multi-process launcher needs mpirun; `--multi_gpu` is its torchrun launcher,
    # and the recipe's Accelerator(cpu=True) then joins a gloo process group on a machine without CUDA.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port),
           str(Path(__file__).with_name("ddp_train_class_worker.py")), str(data), str(out), method, *extra]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_two_process_run_keeps_ranks_identical(tmp_path, method="lora"):
    data = write_dataset(tmp_path / "data")
    _launch_two(data, tmp_path, method)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["losses"] != r1["losses"]  # each rank saw its own shard of every batch
    assert r0["params"].keys() == r1["params"].keys() and r0["params"]
    for n, p in r0["params"].items():
        assert torch.equal(p, r1["params"][n]), n
    trained = [n for n, p in r0["params"].items() if "lora_B" in n or method == "fft"]
    assert any(r0["params"][n].abs().sum() > 0 for n in trained)
    assert (tmp_path / "run" / "final").is_dir()


@pytest.mark.slow
def test_global_batch_gives_one_and_two_processes_the_same_optimizer_steps(tmp_path):
    """train.global_batch_size 8, 2 per device: 1 process accumulates 4 micro-steps, 2 processes 2;
    both take 16 / 8 = 2 optimizer steps over the same examples and end with the same LoRA weights."""
    data = write_dataset(tmp_path / "data")  # 16 images
    _launch_two(data, tmp_path / "two", "lora", "global", port=29518)
    two = torch.load(tmp_path / "two" / "rank0.pt", weights_only=False)
    torch.set_num_threads(1)
    one = train(global_batch_config(data, tmp_path / "one" / "run"))
    assert (one.grad_accum, two["grad_accum"]) == (4, 2)
    assert one.total_steps == two["total_steps"] == 2 == len(one.history)
    params = {n: p.detach() for n, p in one.accelerator.unwrap_model(one.model).named_parameters() if p.requires_grad}
    assert params.keys() == two["params"].keys()
    moved = 0
    for n, p in params.items():
        torch.testing.assert_close(p, two["params"][n], rtol=1e-4, atol=1e-5, msg=n)
        moved += "lora_B" in n and bool(p.abs().sum() > 0)
    assert moved  # the update happened, and was the same

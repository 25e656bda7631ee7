"""The DP recipe end to end on a tiny VAR: one process, a sweep, and two processes (gloo)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _class_tiny import tiny_config, write_dataset

from arbooth.adapt.finetuned import load_finetuned
from arbooth.config import from_dict, to_dict
from arbooth.recipes.train_class_dp import ClassDPConfig, train

HERE = Path(__file__).resolve().parent


def _cfg(data: Path, out: Path, method: str, **privacy) -> ClassDPConfig:
    base = to_dict(tiny_config(data, out, method=method))
    base["privacy"] = {"sample_rate": 0.5, "aug_multiplicity": 2, "max_grad_norm": 0.5,
                       "max_physical_batch_size": 3, "noise_seed": 0, **privacy}
    return from_dict(ClassDPConfig, base)


@pytest.mark.parametrize("method,clipping", [("lora", "ghost"), ("fft", "explicit"), ("fft", "book_keeping")])
def test_dp_recipe_trains_and_records_privacy(tmp_path: Path, method: str, clipping: str) -> None:
    data = write_dataset(tmp_path / "data")
    cfg = _cfg(data, tmp_path / "out", method, epsilon=8.0, clipping=clipping)
    run = train(cfg)[0]
    rep = yaml.safe_load((tmp_path / "out" / "final" / "privacy.yaml").read_text())
    assert rep["steps"] == run.total_steps == 6 and not rep["stopped_by_budget"]
    assert 0 < rep["epsilon_spent"] <= 8.0 and rep["delta"] == 1 / 16
    assert [h["epsilon"] for h in run.history] == sorted(h["epsilon"] for h in run.history)
    ft = load_finetuned(tmp_path / "out" / "final")  # the result loads like a non-private one
    assert ft.method == method and ft.step == 6


def test_epsilon_sweep_writes_one_result_per_value(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", per_class=4)
    cfg = from_dict(ClassDPConfig, {**to_dict(_cfg(data, tmp_path / "out", "lntuning")),
                                    "train": {**to_dict(_cfg(data, tmp_path, "lntuning"))["train"],
                                              "max_steps": 2, "out_dir": str(tmp_path / "out")}}
                    | {"privacy": {"epsilon": [1, 100], "sample_rate": 0.5, "max_physical_batch_size": 8}})
    runs = train(cfg)
    spent = [yaml.safe_load((tmp_path / "out" / f"eps_{e}" / "final" / "privacy.yaml").read_text())
             for e in (1, 100)]
    assert [r["target_epsilon"] for r in spent] == [1, 100]
    assert runs[0].pt.noise_multiplier > runs[1].pt.noise_multiplier
    assert all(r["epsilon_spent"] <= r["target_epsilon"] for r in spent)


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "OMP_NUM_THREADS": "1"}
    # accelerate's `--cpu` multi-process launcher needs mpirun; `--multi_gpu` is its torchrun launcher,
    # and Accelerator(cpu=True) then joins a gloo process group on a machine without CUDA.
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                           "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", "--main_process_port", "29531",
                           str(HERE / "dp_recipe_script.py"), str(data), str(out)],
                          check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{i}.pt") for i in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 2
    torch.testing.assert_close(r0["params"], r1["params"])
    assert (out / "final" / "privacy.yaml").is_file()


def test_train_class_cli_dispatches_on_privacy_section(tmp_path: Path, capsys) -> None:
    from arbooth.cli import main as cli
    from arbooth.config import save_config

    data = write_dataset(tmp_path / "data")
    save_config(tiny_config(data, tmp_path / "out", method="lora"), tmp_path / "plain.yaml")
    rc = cli(["train-class", "--config", str(tmp_path / "plain.yaml"), "privacy.epsilon=8",
              "privacy.sample_rate=0.5", "privacy.max_physical_batch_size=4", "privacy.aug_multiplicity=1"])
    assert rc == 0 and "done: epsilon" in capsys.readouterr().out
    assert (tmp_path / "out" / "final" / "privacy.yaml").is_file()
    capsys.readouterr()
    rc = cli(["train-class", "--config", str(tmp_path / "plain.yaml"), "--resume", "auto", "privacy.epsilon=8"])
    assert rc == 2  # another privacy config (default sample rate ...): a one-line refusal, not a traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "privacy.sample_rate: 0.5 -> 0.251" in err[0]


def test_unreachable_budget_is_found_before_the_model_loads_or_an_image_is_read(tmp_path: Path) -> None:
    """Issue 23.5: the DP setup loaded the model and read every image before finding that the epsilon target
    cannot be met. Now the budget is checked first (no image is read: these are not even images; the
    checkpoints do not exist), for every value of a sweep before the first run, and the folder is untouched."""
    from arbooth.errors import ConfigError

    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(4):
            (data / c / f"{i}.png").write_bytes(b"not an image")
    base = to_dict(_cfg(data, tmp_path / "out", "lora", epsilon=[10.0, 1e-9], accountant="rdp", sample_rate=1.0))
    base["model"] |= {"vae_ckpt": str(tmp_path / "no_vae.pth"), "var_ckpt": str(tmp_path / "no_var.pth")}
    with pytest.raises(ConfigError, match="privacy.accountant=rdp at target epsilon 1e-09"):
        train(from_dict(ClassDPConfig, base))
    assert not (tmp_path / "out").exists()

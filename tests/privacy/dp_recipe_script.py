"""Run by test_train_class_dp.py under `accelerate launch --num_processes 2` (gloo on the CPU): a tiny DP run;
every rank writes a digest of its trainable parameters so the test can compare them."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for _class_tiny (script, not library)
from _class_tiny import tiny_config

from arbooth.config import from_dict, to_dict
from arbooth.recipes.train_class_dp import ClassDPConfig, train

data, out = Path(sys.argv[1]), Path(sys.argv[2])
base = to_dict(tiny_config(data, out, method="lora"))
base["train"]["max_steps"] = 2
base["privacy"] = {"epsilon": 50.0, "sample_rate": 0.5, "aug_multiplicity": 2, "max_grad_norm": 0.5,
                   "max_physical_batch_size": 2, "noise_seed": 0}
run = train(from_dict(ClassDPConfig, base))[0]
flat = torch.cat([p.detach().flatten() for p in run.model.parameters() if p.requires_grad])
rank = run.accelerator.process_index
torch.save({"params": flat, "steps": run.pt.steps_taken, "world": run.accelerator.num_processes}, out / f"rank{rank}.pt")

"""Worker for test_train_class_ddp.py, started by `accelerate launch --num_processes 2 --cpu`:
trains the tiny VAR with LoRA and writes this rank's trainable parameters and losses.
A fourth argument "global" trains one epoch with a logical batch of 8 (train.global_batch_size) and
no class dropout, so the run can be compared with a 1-process run of the same config."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for _class_tiny
from _class_tiny import global_batch_config, tiny_config

from arbooth.recipes.train_class import train


def main() -> None:
    data_root, out_dir, method = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    if sys.argv[4:] == ["global"]:
        cfg = global_batch_config(data_root, out_dir / "run", method)
    else:
        cfg = tiny_config(data_root, out_dir / "run", method, train={"max_steps": 3, "batch_size": 2, "grad_accum": 2},
                          optim={"lr": 1e-2})
    run = train(cfg)
    acc = run.accelerator
    params = {n: p.detach().clone() for n, p in acc.unwrap_model(run.model).named_parameters() if p.requires_grad}
    torch.save({"params": params, "losses": [h["loss"] for h in run.history], "world": acc.num_processes,
                "grad_accum": run.grad_accum, "total_steps": run.total_steps},
               out_dir / f"rank{acc.process_index}.pt")


if __name__ == "__main__":
    main()

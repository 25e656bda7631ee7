"""ARBooth step time and peak memory: the tiny model on the CPU, and Infinity-2B with random weights
at 1024x1024 (bf16, the default recipe: ca+ffn tuned, teacher + two AdamW steps) when CUDA is there.

    PYTHONPATH=. python benchmarks/train_subject.py [--steps 3] [--size tiny|2b|both] [--out bench.json]

Random text features stand in for T5 (its cost is paid once at setup); random VAE features stand in for
the photos (the VAE encoder runs once at setup; bitwise self-correction runs every step). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from arbooth.adapt.selective import SelectiveTuner, tensors_sha256
from arbooth.adapt.subject_token import SubjectToken
from arbooth.models import BSQVAE, Infinity, infinity_scale_schedule
from arbooth.recipes.subject_config import ModelConfig, SubjectTrainConfig
from arbooth.recipes.train_subject import Run, train_step
from arbooth.toy.tiny import TINY


def bench(size: str, steps: int) -> dict:
    cuda = size == "2b"
    dev = torch.device("cuda" if cuda else "cpu")
    pn = "1M" if cuda else "0.06M"
    cfg = SubjectTrainConfig(subject="-", model=ModelConfig(pn=pn, tuned_dtype="bf16" if cuda else "fp32"),
                             dtype="bf16" if cuda else "fp32", device=str(dev), validate_every=0)
    torch.manual_seed(0)
    with torch.device(dev):
        if cuda:
            vae = BSQVAE().eval().requires_grad_(False)
            model = Infinity(vae, gradient_checkpointing=True)
        else:
            vae = BSQVAE(**TINY["vae"]).eval().requires_grad_(False)
            model = Infinity(vae, **TINY["model"], gradient_checkpointing=True)
    if cuda:
        model.blocks.to(torch.bfloat16)
    schedule = [tuple(s) for s in infinity_scale_schedule(1.0, pn)]
    L, d, C = sum(h * w for _, h, w in schedule), vae.codebook_dim, model.text_channels
    tuner = SelectiveTuner(model)
    token = SubjectToken(4, C).to(dev)
    opt = torch.optim.AdamW([token.embedding_PC, *tuner.params.values()], lr=cfg.optim.lr, weight_decay=0.005)
    _, H, W = schedule[-1]
    features = torch.randn(4, d, H, W, device=dev)
    mask = torch.ones(1, 12, dtype=torch.bool, device=dev)
    ph = torch.zeros_like(mask)
    ph[0, 3] = True
    feats = torch.randn(1, 12, C, device=dev)
    acc = Accelerator(cpu=not cuda)
    run = Run(cfg, acc, model, tuner, token, opt, schedule, cfg.loss.weights_for(len(schedule)), vae, features,
              (feats, mask, ph), (feats[:, :8], mask[:, :8]), None, torch.Generator(dev).manual_seed(0),
              torch.Generator(dev).manual_seed(1), "random", tensors_sha256({}))
    model.train()
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        train_step(run, torch.arange(cfg.batch_size, device=dev))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    mem = tuner.teacher_memory()
    return {"size": size, "device": torch.cuda.get_device_name() if cuda else "cpu", "pn": pn, "tokens": L,
            "batch": cfg.batch_size, "step_s": sum(times[1:]) / steps, "first_step_s": times[0],
            "peak_mem_gb": (torch.cuda.max_memory_allocated() if cuda else
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
            "trainable_params": tuner.num_trainable(),
            "teacher_gb": mem["teacher_bytes"] / 2**30, "full_copy_gb": mem["full_copy_bytes"] / 2**30,
            "est_500_steps_min": sum(times[1:]) / steps * 500 / 60}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", choices=["tiny", "2b", "both"], default="both")
    ap.add_argument("--out", default="benchmarks/results/train_subject.json")
    a = ap.parse_args()
    sizes = ["tiny", "2b"] if a.size == "both" else [a.size]
    rows = [bench(s, a.steps) for s in sizes if s == "tiny" or torch.cuda.is_available()]
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

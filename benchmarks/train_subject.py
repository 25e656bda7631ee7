"""ARBooth step time and peak memory: the tiny model on the CPU, and Infinity-2B with random weights
at 1024x1024 (bf16, the default recipe: ca+ffn tuned, teacher + two AdamW steps) when CUDA is there.

    PYTHONPATH=. python benchmarks/train_subject.py [--steps 3] [--size tiny|2b|both] [--methods full lora]
        [--rank 16] [--no-checkpointing] [--out bench.json]

Each tuning method (tuning.method: full = the authors' selective tuning, lora = LoRA on the same layers)
gets a fresh model in turn, and the CUDA peak is reset between them, so one GPU run measures both.

Random text features stand in for T5 (its cost is paid once at setup); random VAE features stand in for
the photos (the VAE encoder runs once at setup; bitwise self-correction runs every step). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from arbooth.adapt.subject_token import SubjectToken
from arbooth.models import BSQVAE, Infinity, infinity_scale_schedule
from arbooth.recipes.subject_config import SubjectTrainConfig, TuningConfig
from arbooth.recipes.train_subject import Run, build_optimizer, build_tuner, train_step
from arbooth.subject_bases import ModelConfig
from arbooth.toy.tiny import TINY


def bench(size: str, steps: int, method: str = "full", rank: int = 16, checkpointing: bool = True) -> dict:
    cuda = size == "2b"
    dev = torch.device("cuda" if cuda else "cpu")
    pn = "1M" if cuda else "0.06M"
    cfg = SubjectTrainConfig(subject="-", model=ModelConfig(pn=pn, tuned_dtype="bf16" if cuda else "fp32"),
                             dtype="bf16" if cuda else "fp32", device=str(dev), validate_every=0,
                             gradient_checkpointing=checkpointing, tuning=TuningConfig(method=method, lora_rank=rank))
    torch.manual_seed(0)
    with torch.device(dev):
        if cuda:
            vae = BSQVAE().eval().requires_grad_(False)
            model = Infinity(vae, gradient_checkpointing=checkpointing)
        else:
            vae = BSQVAE(**TINY["vae"]).eval().requires_grad_(False)
            model = Infinity(vae, **TINY["model"], gradient_checkpointing=checkpointing)
    if cuda:
        model.blocks.to(torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
    schedule = [tuple(s) for s in infinity_scale_schedule(1.0, pn)]
    L, d, C = sum(h * w for _, h, w in schedule), vae.token_dim, model.text_channels
    tuner = build_tuner(model, cfg.tuning)
    token = SubjectToken(4, C).to(dev)
    opt = build_optimizer(cfg, token, tuner, dev)
    _, H, W = schedule[-1]
    features = torch.randn(4, d, H, W, device=dev)
    mask = torch.ones(1, 12, dtype=torch.bool, device=dev)
    ph = torch.zeros_like(mask)
    ph[0, 3] = True
    feats = torch.randn(1, 12, C, device=dev)
    acc = Accelerator(cpu=not cuda)
    run = Run(cfg, acc, model, tuner, token, opt, schedule, cfg.loss.weights_for(len(schedule)), vae, features,
              (feats, mask, ph), (feats[:, :8], mask[:, :8]), None, torch.Generator(dev).manual_seed(0),
              torch.Generator(dev).manual_seed(1), "random", "-")
    model.train()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        train_step(run, torch.arange(cfg.batch_size, device=dev))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    mem = tuner.teacher_memory()
    return {"size": size, "method": method, "rank": rank if method == "lora" else None,
            "checkpointing": checkpointing, "device": torch.cuda.get_device_name() if cuda else "cpu", "pn": pn, "tokens": L,
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
    ap.add_argument("--methods", nargs="+", choices=["full", "lora"], default=["full", "lora"],
                    help="tuning.method values, each measured on a fresh model")
    ap.add_argument("--rank", type=int, default=16, help="tuning.lora_rank")
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default="benchmarks/results/train_subject.json")
    a = ap.parse_args()
    sizes = ["tiny", "2b"] if a.size == "both" else [a.size]
    rows = []
    for s in sizes:
        if s == "2b" and not torch.cuda.is_available():
            continue
        for m in a.methods:
            rows.append(bench(s, a.steps, m, a.rank, a.checkpointing))
            gc.collect()  # the previous method's model is garbage now; measure the next one from zero
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

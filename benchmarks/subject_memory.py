"""Peak memory of one ARBooth training step at Infinity-2B width and 1024x1024 (13 scales), measured
without a GPU: the process's peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs)
while the real step runs on the CPU (the same code as on a GPU: bf16 blocks under bf16 autocast,
gradient checkpointing, the KV-cached teacher, bitwise self-correction, two stochastic-rounding AdamW
steps), above what the process held before the model was built, for a few depths. Every block costs
the same, so the peak is linear in depth; the fitted line is extrapolated to the 32 blocks of
Infinity-2B, and the BSQ-VAE's weights (built once, before the baseline) are added.

    PYTHONPATH=. python benchmarks/subject_memory.py [--depths 1 2 3] [--batch 2] [--out ...]

What this does not see: the CUDA caching allocator's fragmentation and workspaces, the CUDA context
(~0.5 GB), and kernels that differ between CPU and GPU (SDPA picks its backend per device; CPU
autocast casts a few ops differently). Read the result as the tensor memory the step needs; the GPU
benchmark (`benchmarks/train_subject.py --size 2b`) measures the real peak when a GPU is lent.
Random text features stand in for T5 and random VAE features for the photos (both are computed once
at setup and then freed). Takes ~2 min per block on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from arbooth.adapt.selective import SelectiveTuner
from arbooth.adapt.subject_token import SubjectToken
from arbooth.models import BSQVAE, Infinity, infinity_scale_schedule
from arbooth.optim import StochasticRoundingAdamW
from arbooth.recipes.subject_config import ModelConfig, SubjectTrainConfig
from arbooth.recipes.train_subject import Run, train_step

GiB = 2**30
FULL_DEPTH = 32  # Infinity-2B


def _status_gib(key: str) -> float:
    kb = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(kb.group(1)) / 2**20


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


def measure(depth: int, batch: int, steps: int, vae: BSQVAE) -> dict:
    cfg = SubjectTrainConfig(subject="-", model=ModelConfig(pn="1M", tuned_dtype="bf16"), dtype="bf16",
                             device="cpu", batch_size=batch, validate_every=0)
    schedule = [tuple(s) for s in infinity_scale_schedule(1.0, "1M")]
    gc.collect()
    base = _status_gib("VmRSS")
    _reset_peak()
    torch.manual_seed(0)
    model = Infinity(vae, depth=depth, block_chunks=1, checkpointing=True)  # 2B width, heads, text channels
    model.blocks.to(torch.bfloat16)
    tuner = SelectiveTuner(model)
    token = SubjectToken(cfg.tuning.text_prefix_length, model.text_channels)
    o = cfg.optim
    opt = StochasticRoundingAdamW([token.embedding_PC, *tuner.params.values()], lr=o.lr, betas=o.betas, eps=o.eps,
                                  weight_decay=o.weight_decay, generator=torch.Generator().manual_seed(3))
    _, H, W = schedule[-1]
    features = torch.randn(4, vae.codebook_dim, H, W)
    T = 16  # "a photo of <S*> dog" + the 4-token prefix, about this many T5 tokens
    text = torch.randn(1, T, model.text_channels)
    mask = torch.ones(1, T, dtype=torch.bool)
    ph = torch.zeros_like(mask)
    ph[0, 4] = True
    run = Run(cfg, Accelerator(cpu=True), model, tuner, token, opt, schedule, cfg.loss.weights_for(len(schedule)), vae,
              features, (text, mask, ph), (text[:, :8], mask[:, :8]), None, torch.Generator().manual_seed(1),
              torch.Generator().manual_seed(2), "random", "-")
    model.train()
    held = _status_gib("VmRSS") - base  # weights, teacher originals, inputs
    times = []
    for _ in range(steps):  # the first step allocates the optimizer states, the second runs with them
        t0 = time.perf_counter()
        train_step(run, torch.arange(batch))
        times.append(time.perf_counter() - t0)
    peak = _status_gib("VmHWM") - base
    mem = tuner.teacher_memory()
    row = {"depth": depth, "batch": batch, "tokens": sum(h * w for _, h, w in schedule), "step_s": times[-1],
           "peak_gib": peak, "held_before_step_gib": held, "trainable": tuner.num_trainable(),
           "teacher_originals_gib": mem["teacher_bytes"] / GiB}
    del run, model, tuner, token, opt
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3],
                    help="model depths to measure (at least two; more checks the linearity)")
    ap.add_argument("--batch", type=int, default=2, help="photos per step (the 2B default is 2)")
    ap.add_argument("--steps", type=int, default=2, help="steps per depth; the peak is over all of them")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/subject_memory.json")
    a = ap.parse_args()
    if len(set(a.depths)) < 2:
        ap.error("--depths needs at least two different depths to extrapolate")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    vae = BSQVAE().eval().requires_grad_(False)  # the d32 VAE of Infinity-2B, random weights
    vae_gib = sum(p.numel() * p.element_size() for p in vae.parameters()) / GiB
    rows = []
    for depth in sorted(set(a.depths)):
        rows.append(measure(depth, a.batch, a.steps, vae))
        r = rows[-1]
        print(f"depth {depth}: peak {r['peak_gib']:.2f} GiB, step {r['step_s']:.0f} s", flush=True)
    # least-squares line through (depth, peak): the per-block cost and the rest
    d = torch.tensor([r["depth"] for r in rows], dtype=torch.float64)
    p = torch.tensor([r["peak_gib"] for r in rows], dtype=torch.float64)
    A = torch.stack([torch.ones_like(d), d], 1)
    (c0, c1) = torch.linalg.lstsq(A, p.unsqueeze(1)).solution.squeeze(1).tolist()
    worst = float((A @ torch.tensor([c0, c1], dtype=torch.float64) - p).abs().max())
    total = c0 + c1 * FULL_DEPTH + vae_gib
    est = {"per_block_gib": c1, "rest_gib": c0, "vae_gib": vae_gib, "fit_max_residual_gib": worst,
           f"estimated_peak_gib_depth{FULL_DEPTH}": total}
    print("depth | tokens | batch | step_s (CPU) | held before step GiB | peak GiB | trainable params | "
          "teacher originals GiB")
    for r in rows:
        print(f"{r['depth']} | {r['tokens']} | {r['batch']} | {r['step_s']:.1f} | {r['held_before_step_gib']:.3f} | "
              f"{r['peak_gib']:.3f} | {r['trainable']:,} | {r['teacher_originals_gib']:.3f}")
    print(f"peak = {c0:.3f} GiB + {c1:.3f} GiB per block (largest fit residual {worst:.4f} GiB); {FULL_DEPTH} blocks "
          f"+ the VAE ({vae_gib:.2f} GiB): {total:.2f} GiB")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"rows": rows, "estimate": est}, indent=1))


if __name__ == "__main__":
    main()

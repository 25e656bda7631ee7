"""Infinity sampling speed: KV-cached sampler vs the no-cache reference path.

1. CPU, a small random model (depth 4, width 256, d=16 VAE) at 256x256 (pn 0.06M, 7 scales), batch 1.
2. GPU only (skipped with a note otherwise): the 2B model with random weights at 1024x1024 (pn 1M,
   13 scales), bf16 autocast with blocks cast to bf16 as in the release's inference, cfg 4, batch 1;
   images/s and peak memory. The Infinity paper reports about 0.8 s per 1024x1024 image.

Usage: python benchmarks/generate_infinity.py [--out benchmarks/results/generate_infinity.json] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from arbooth.models import BSQVAE, Infinity, infinity_scale_schedule


def _time(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def bench_cpu(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    vae = BSQVAE(codebook_dim=16, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 2, 2, 2)).eval()
    model = Infinity(vae, depth=4, embed_dim=256, num_heads=4, text_channels=256, text_maxlen=16, block_chunks=2).eval()
    schedule = infinity_scale_schedule(1.0, "0.06M")
    text, mask = torch.randn(1, 8, 256), torch.ones(1, 8, dtype=torch.bool)
    rows = []
    for use_cache in (True, False):
        s = _time(lambda uc=use_cache: model.generate(text, mask, schedule, seed=0, use_cache=uc), repeats)
        rows.append({"setting": "cpu small 256x256 fp32", "sampler": "kv-cache" if use_cache else "no-cache",
                     "seconds_per_image": s, "images_per_s": 1 / s, "peak_mem_gib": None})
    return rows


def bench_gpu_2b(repeats: int) -> list[dict]:
    dev = torch.device("cuda")
    with dev:
        vae = BSQVAE().eval()
        model = Infinity(vae).eval()
    for block in model.blocks:  # as tools/run_infinity.py --bf16 1
        block.bfloat16()
    schedule = infinity_scale_schedule(1.0, "1M")
    text, mask = torch.randn(1, 32, 2048, device=dev), torch.ones(1, 32, dtype=torch.bool, device=dev)
    rows = []
    for use_cache in (True, False):
        torch.cuda.reset_peak_memory_stats()
        s = _time(lambda uc=use_cache: model.generate(text, mask, schedule, seed=0, use_cache=uc), repeats,
                  torch.cuda.synchronize)
        rows.append({"setting": "gpu 2B 1024x1024 bf16", "sampler": "kv-cache" if use_cache else "no-cache",
                     "seconds_per_image": s, "images_per_s": 1 / s,
                     "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/generate_infinity.json"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows, notes = bench_cpu(args.repeats), []
    if torch.cuda.is_available():
        rows += bench_gpu_2b(args.repeats)
        notes.append(f"GPU: {torch.cuda.get_device_name()}; paper: ~0.8 s per 1024x1024 image (2B)")
    else:
        notes.append("no CUDA device: 2B 1024x1024 benchmark skipped")
    print(f"{'setting':<26}{'sampler':<10}{'s/image':>10}{'images/s':>10}{'peak GiB':>10}")
    for r in rows:
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        print(f"{r['setting']:<26}{r['sampler']:<10}{r['seconds_per_image']:>10.3f}{r['images_per_s']:>10.2f}{mem:>10}")
    for n in notes:
        print("note:", n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "notes": notes, "torch": torch.__version__,
                                    "threads": torch.get_num_threads()}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()

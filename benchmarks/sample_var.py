"""Images/s of VAR sampling: the KV-cached sampler against the no-cache reference path (which re-runs
every earlier token at each scale). Random weights: speed does not depend on them.

Cases: `tiny` (the 64x64 smoke model: tokens only, and `tiny+decode` with the tokenizer's decoder, which
then dominates) and `small-10-scales` (depth 4, width 256, the released 10-scale schedule, tokens only)
on the CPU; `d16-bf16` (batch 32, full generate) when CUDA is available.

    python benchmarks/sample_var.py [--repeats 3] [--threads 1] [--out benchmarks/results/sample_var.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch

from arbooth.models import VAR, VQVAE
from arbooth.models.var import PATCH_NUMS, VAE_PRESET, VAR_PRESETS
from arbooth.toy.tiny import build_tiny_var


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _cases(device_cpu: torch.device):
    torch.manual_seed(0)
    tiny = build_tiny_var(seed=0)
    yield "tiny", tiny, 8, "fp32", False, device_cpu
    yield "tiny+decode", tiny, 8, "fp32", True, device_cpu
    small_vae = VQVAE(vocab_size=512, z_channels=8, ch=32, patch_nums=PATCH_NUMS)
    small = VAR(small_vae, num_classes=10, depth=4, embed_dim=256, num_heads=4, patch_nums=PATCH_NUMS).eval()
    yield "small-10-scales", small, 8, "fp32", False, device_cpu
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        with cuda:
            d16 = VAR(VQVAE(**VAE_PRESET), **VAR_PRESETS[16]).eval()
        yield "d16-bf16", d16, 32, "bf16", True, cuda


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/sample_var.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1 gives stable numbers on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name, var, batch, dtype, decode, device in _cases(torch.device("cpu")):
        labels = torch.arange(batch, device=device) % var.num_classes
        result = {"case": name, "batch": batch, "dtype": dtype, "decode": decode, "device": str(device),
                  "tokens_per_image": var.L}
        for cached in (True, False):
            sample = partial(var.generate, labels, top_k=900, top_p=0.96, seed=0, dtype=dtype, decode=decode,
                             use_kv_cache=cached)
            secs = _time(sample, args.repeats, device)
            result["kv_cache" if cached else "no_cache"] = {"seconds": secs, "images_per_s": batch / secs}
        result["speedup"] = result["kv_cache"]["images_per_s"] / result["no_cache"]["images_per_s"]
        rows.append(result)

    print(f"{'case':<18}{'device':<8}{'batch':>6}{'dtype':>7}{'decode':>8}"
          f"{'kv img/s':>11}{'no-cache img/s':>16}{'speed-up':>10}")
    for r in rows:
        print(f"{r['case']:<18}{r['device']:<8}{r['batch']:>6}{r['dtype']:>7}{r['decode']!s:>8}"
              f"{r['kv_cache']['images_per_s']:>11.2f}{r['no_cache']['images_per_s']:>16.2f}{r['speedup']:>9.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

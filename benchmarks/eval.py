"""Throughput of the evaluation feature extractors: images/s on the CPU, and on the GPU when there is one.

    python benchmarks/eval.py [--batch-size 32] [--iters 3] [--out benchmarks/results/eval.json]

Weights are random (the speed does not depend on them). Measured: DINO ViT-S/16 at 224 and at 256
(dreammatcher), CLIP ViT-B/32 image tower at 224, LPIPS-AlexNet pairs at 256, and the FID Inception-v3
on 256x256 uint8 input when torch-fidelity is installed (its architecture with random weights).
Prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from arbooth.errors import CheckpointError
from arbooth.metrics.extractors import DinoViT, InceptionFID, OpenClip, build_lpips


def _time(fn, x, iters: int, device: torch.device) -> float:
    with torch.no_grad():
        fn(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return iters * x.shape[0] / (time.perf_counter() - t)


def run(device: torch.device, batch: int, iters: int) -> list[dict]:
    rows = []
    dino = DinoViT(None).to(device)
    clip = OpenClip(None).to(device)
    lpips_fn = build_lpips(None).to(device)
    x224 = torch.randn(batch, 3, 224, 224, device=device)
    x256 = torch.rand(batch, 3, 256, 256, device=device) * 2 - 1
    cases = [("DINO ViT-S/16 @224", dino, x224), ("DINO ViT-S/16 @256 (dreammatcher)", dino, x256),
             ("CLIP ViT-B/32 image @224", clip.encode_image, x224),
             ("LPIPS-AlexNet pairs @256", lambda x: lpips_fn(x, x.flip(0)), x256)]
    try:
        inception = InceptionFID(None).to(device)
    except CheckpointError as e:  # torch-fidelity not installed
        print(f"skipping Inception: {e}")
    else:
        cases.append(("FID Inception-v3 pool3 (uint8 256 -> 299)", inception,
                      torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)))
    for name, fn, x in cases:
        rows.append({"extractor": name, "device": str(device), "batch": batch,
                     "images_per_s": round(_time(fn, x, iters, device), 2)})
        print(f"| {name} | {device} | {batch} | {rows[-1]['images_per_s']:.1f} |", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/eval.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| extractor | device | batch | images/s |\n|---|---|---|---|")
    rows = run(torch.device("cpu"), args.batch_size, args.iters)
    if torch.cuda.is_available():
        rows += run(torch.device("cuda"), args.batch_size * 4, args.iters * 5)
    meta = {"torch": torch.__version__, "cpu_threads": args.threads, "machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()

"""Training throughput and peak memory of FFT / LoRA / LNTuning (and the LoRA ablations) on VAR.

Each method runs in its own process (so peak memory is that method's alone): a few warm-up steps, then
timed optimizer steps of the transformer (forward, VAR loss, backward, grad clipping, AdamW) on random
tokens; the frozen tokenizer's encoding is the same for every method and left out. On CUDA: d16 in bf16
(autocast, fp32 weights), peak from `torch.cuda.max_memory_allocated`. On the CPU: a tiny model in fp32,
peak resident memory of the process (minus its size before the model was built).

  python benchmarks/train_class.py                      # tiny on CPU, or d16 bf16 when CUDA is there
  python benchmarks/train_class.py --depth 16 --batch-size 16 --json out.json
Prints a table and the FFT : LoRA : LNTuning ratios, and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("fft", "lora", "lntuning", "lora_attn", "lora_mlp")
TINY = {"depth": 4, "embed_dim": 128, "num_heads": 4, "num_classes": 10, "patch_nums": (1, 2, 3, 4, 6, 8),
        "vocab_size": 256, "z_channels": 8, "vae_ch": 32, "vae_ch_mult": (1, 2)}


def one_method(method: str, depth: int | None, batch_size: int, steps: int, device: str) -> dict:
    from arbooth.adapt.finetuned import build_vae_var
    from arbooth.adapt.methods import count_parameters, prepare_for_method
    from arbooth.models.var_training import build_optimizer, forward_backward, random_batch
    from arbooth.recipes.class_config import ModelConfig, OptimConfig

    dev = torch.device(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)
    mcfg = ModelConfig(depth=depth) if depth else ModelConfig(**TINY)
    torch.manual_seed(0)
    _, var = build_vae_var(mcfg, device=dev)
    model = prepare_for_method(var, method).train()
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    precision = "bf16" if dev.type == "cuda" else "fp32"
    B = batch_size
    batch = random_batch(var, B, dev)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        forward_backward(model, batch, precision=precision, device=dev)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - rss0)
    return {"method": method, "trainable_params": count_parameters(model).trainable, "steps_per_s": steps / dt,
            "images_per_s": steps * B / dt, "peak_mem_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--depth", type=int, default=16 if cuda else None, help="released size; default tiny on CPU")
    ap.add_argument("--batch-size", type=int, default=16 if cuda else 8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--json", default="benchmarks/results/train_class.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print its JSON
    args = ap.parse_args()
    if args.one:
        if args.device == "cpu":  # one thread: stable, comparable numbers on shared CI cores
            torch.set_num_threads(1)
        print(json.dumps(one_method(args.one, args.depth, args.batch_size, args.steps, args.device)))
        return
    rows = []
    for m in args.methods:
        cmd = [sys.executable, __file__, "--one", m, "--device", args.device, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps)] + (["--depth", str(args.depth)] if args.depth else [])
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    size = f"d{args.depth}" if args.depth else "tiny (depth 4, width 128, 6 scales)"
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    mem = "peak GiB (CUDA allocated)" if args.device == "cuda" else "peak GiB (RSS growth)"
    print(f"VAR {size}, batch {args.batch_size}, {'bf16' if args.device == 'cuda' else 'fp32'}, {where}")
    print(f"{'method':<10} {'trainable':>11} {'steps/s':>9} {'img/s':>8} {mem:>26}")
    for r in rows:
        print(f"{r['method']:<10} {r['trainable_params'] / 1e6:>10.2f}M {r['steps_per_s']:>9.3f} "
              f"{r['images_per_s']:>8.1f} {r['peak_mem_gib']:>26.3f}")
    by = {r["method"]: r for r in rows}
    ratios = {}
    if all(m in by for m in ("fft", "lora", "lntuning")):
        ratios = {k: [round(by[m][k] / by["lora"][k], 3) if by["lora"][k] else None
                      for m in ("fft", "lora", "lntuning")] for k in ("steps_per_s", "peak_mem_gib")}
        print(f"FFT : LoRA : LNTuning  steps/s {ratios['steps_per_s']}  peak memory {ratios['peak_mem_gib']}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": size, "device": where, "batch_size": args.batch_size, "rows": rows,
                               "ratios_fft_lora_lntuning": ratios}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

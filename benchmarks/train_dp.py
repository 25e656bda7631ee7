"""DP-SGD step cost against the same non-private step, per method and augmentation multiplicity k.

For each method (fft, lora, lntuning) and k, one training step of the VAR transformer on B examples x
k views (N = B*k teacher-forced sequences; synthetic tokens, so the tokenizer is not timed) runs as:
  nonprivate   mean loss over the N rows, backward, AdamW step
  dp           Opacus per-example gradients (mean over views), clip, noise, AdamW step
  dp_ghost     the same with ghost clipping (per-example norms without per-example gradients)
and we report the median step time and the peak memory of the step, each relative to nonprivate.
Each configuration runs in its own process so peak memory is its own: on CUDA the allocator's peak
above what was allocated before the step; on the CPU the growth of the process' peak RSS over the
step (coarser). Target (issue 4): LoRA + ghost within 1.5x the time and 1.3x the memory per view.

    python benchmarks/train_dp.py                  # tiny VAR on the CPU (d16 when CUDA is available)
    python benchmarks/train_dp.py --size d16 --batch 2 --views 1 8 32 --json out.json
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # tokenizer + transformer constructor arguments
    "tiny": {"vae": {"vocab_size": 64, "z_channels": 8, "ch": 32, "share_quant_resi": 4,
                     "patch_nums": (1, 2, 3, 4), "ch_mult": (1, 1)},
             "var": {"num_classes": 10, "depth": 2, "embed_dim": 128, "num_heads": 4}},
    "d16": {"vae": {"vocab_size": 4096, "z_channels": 32, "ch": 160, "share_quant_resi": 4,
                    "patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)},
            "var": {"num_classes": 1000, "depth": 16, "embed_dim": 1024, "num_heads": 16}},
}
MODES = ("nonprivate", "dp", "dp_ghost")


def run_one(size: str, method: str, views: int, batch: int, mode: str, reps: int, device: str) -> dict:
    import torch

    from arbooth.adapt.methods import prepare_for_method
    from arbooth.models import VAR, VQVAE
    from arbooth.models.var_training import build_optimizer, var_loss
    from arbooth.privacy.engine import make_private
    from arbooth.recipes.class_config import OptimConfig

    torch.manual_seed(0)
    spec = SIZES[size]
    vae = VQVAE(**spec["vae"])
    var = VAR(vae, patch_nums=spec["vae"]["patch_nums"], **spec["var"])
    model = prepare_for_method(var, method).to(device)
    opt = build_optimizer(model, OptimConfig(lr=1e-5))
    n = batch * views
    g = torch.Generator().manual_seed(0)
    label_N = torch.randint(0, var.num_classes, (batch,), generator=g).repeat_interleave(views).to(device)
    x_NLC = torch.randn(n, var.L - var.first_l, var.Cvae, generator=g).to(device)
    idx_NL = torch.randint(0, var.V, (n, var.L), generator=g).to(device)
    if mode == "nonprivate":
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            var_loss(model(label_N, x_NLC), idx_NL).backward()
            opt.step()
    else:
        pt = make_private(model, opt, torch.utils.data.TensorDataset(torch.zeros(batch * 4)),
                          target_epsilon=float("inf"), delta=1e-5, sample_rate=0.25, steps=1,
                          max_grad_norm=0.5, views=views, ghost=mode == "dp_ghost", noise_multiplier=1.0)

        def step() -> None:
            pt.optimizer.zero_grad(set_to_none=True)
            pt.backward(var_loss(pt.module(label_N, x_NLC), idx_NL, reduction="none"))
            pt.optimizer.step()
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(reps + 1):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"time_s": statistics.median(times[1:]), "peak_mem_mb": peak / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES))
    p.add_argument("--methods", nargs="+", default=["fft", "lora", "lntuning"])
    p.add_argument("--views", type=int, nargs="+", default=[1, 8])
    p.add_argument("--batch", type=int, default=4, help="examples per step")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default="benchmarks/results/train_dp.json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size or ("d16" if device == "cuda" else "tiny")
    rows = []
    for method in args.methods:
        for k in args.views:
            res = {}
            for mode in MODES:
                one = {"size": size, "method": method, "views": k, "batch": args.batch, "mode": mode, "reps": args.reps,
                           "device": device}
                out = subprocess.run([sys.executable, __file__, "--one", json.dumps(one)], capture_output=True,
                                     text=True, check=True)
                res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            base = res["nonprivate"]
            row = {"method": method, "views": k, "batch": args.batch, **{
                f"{m}_{q}": res[m][q] for m in MODES for q in ("time_s", "peak_mem_mb")}}
            for m in MODES[1:]:
                row[f"{m}_time_x"] = res[m]["time_s"] / base["time_s"]
                row[f"{m}_mem_x"] = res[m]["peak_mem_mb"] / max(base["peak_mem_mb"], 1e-9)
            rows.append(row)
            print(f"{method:9s} k={k:<3d} nonprivate {base['time_s'] * 1e3:8.1f} ms {base['peak_mem_mb']:8.1f} MB"
                  + "".join(f" | {m} {row[f'{m}_time_x']:5.2f}x time {row[f'{m}_mem_x']:5.2f}x mem"
                            for m in MODES[1:]), flush=True)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "size": size,
            "torch": torch.__version__, "memory": "CUDA allocator peak" if device == "cuda" else "CPU peak RSS growth",
            "target": "lora + dp_ghost <= 1.5x time, <= 1.3x memory per view"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

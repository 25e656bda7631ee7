"""DP-SGD step cost against the same non-private step, per clipping mode, method and augmentation
multiplicity k; and the largest physical batch each mode fits in a memory budget.

For each method (fft, lora, ...) and k, one training step of the VAR transformer on B examples x k views
(N = B*k teacher-forced sequences; synthetic tokens, so the tokenizer is not timed) runs as:
  nonprivate    mean loss over the N rows, backward, AdamW step
  explicit      Opacus per-example gradients (mean over views), clip, noise, AdamW step
  ghost         Opacus ghost clipping: per-example norms, then a second backward of the weighted loss
  book_keeping  one backward: ghost norms / folded per-example gradients and the clipped sum from the
                same activations and output gradients (arbooth/privacy/bookkeeping.py)
and we report the median step time (CPU time of the process on the CPU, run it with OMP_NUM_THREADS=1;
wall time on CUDA) and the peak memory of the step, each relative to nonprivate.
Each configuration runs in its own process so peak memory is its own: on CUDA the allocator's peak
above what was allocated before the timed steps; on the CPU the growth of peak RSS (VmHWM, reset through
/proc/self/clear_refs after a warm-up step and malloc_trim) over the RSS before the timed steps.

--fit-budget-gb G: for each mode, the peak at batch 1 and 2 examples (measured above) is fitted as
a + b*B and the largest B with a + b*B <= G is reported (a linear extrapolation from two measured
points, stated as such in the table and the JSON).

    python benchmarks/train_dp.py --size tiny                 # quick
    OMP_NUM_THREADS=1 python benchmarks/train_dp.py --size d16w --batch 1 2 --views 1 8 --fit-budget-gb 8
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
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
    # VAR-d16 width (1024, 16 heads, the 4096-token head) with 2 blocks and 8 scales (L = 255 tokens):
    # the per-layer shapes that decide each mode's cost, at a depth the CPU can time.
    "d16w": {"vae": {"vocab_size": 4096, "z_channels": 32, "ch": 32, "share_quant_resi": 4,
                     "patch_nums": (1, 2, 3, 4, 5, 6, 8, 10), "ch_mult": (1, 1)},
             "var": {"num_classes": 1000, "depth": 2, "embed_dim": 1024, "num_heads": 16}},
}
MODES = ("nonprivate", "explicit", "ghost", "book_keeping")


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_cpu_peak() -> int:
    """Return freed heap to the OS, reset the peak-RSS mark, and return the RSS now."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_bytes("VmRSS")


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
                          max_grad_norm=0.5, views=views, clipping=mode, noise_multiplier=1.0)

        def step() -> None:
            pt.optimizer.zero_grad(set_to_none=True)
            pt.backward(var_loss(pt.module(label_N, x_NLC), idx_NL, reduction="none"))
            pt.optimizer.step()
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step()  # warm-up: AdamW state, allocator pools, first-call costs
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_cpu_peak()
    # On the CPU the process' CPU time (one thread: OMP_NUM_THREADS=1), which a machine shared with
    # other jobs does not inflate the way it inflates wall time; on CUDA wall time.
    clock = time.perf_counter if cuda else time.process_time
    times = []
    for _ in range(reps):
        sync()
        t0 = clock()
        step()
        sync()
        times.append(clock() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM")) - base
    return {"time_s": statistics.median(times), "peak_mem_mb": peak / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES))
    p.add_argument("--methods", nargs="+", default=["lora", "fft"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--views", type=int, nargs="+", default=[1, 8])
    p.add_argument("--batch", type=int, nargs="+", default=[2], help="examples per step (several: one row each)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--fit-budget-gb", type=float, default=None,
                   help="largest batch per mode within this step-peak budget (needs two --batch values)")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process (no per-process import cost; peaks are then "
                        "measured after malloc_trim over the RSS left by the previous ones)")
    p.add_argument("--json", default="benchmarks/results/train_dp.json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size or ("d16" if device == "cuda" else "tiny")
    modes = ["nonprivate", *[m for m in args.modes if m != "nonprivate"]]
    t_start = time.perf_counter()
    rows, fits = [], []
    for method in args.methods:
        for k in args.views:
            peaks: dict[str, list[tuple[int, float]]] = {m: [] for m in modes}
            for batch in args.batch:
                res = {}
                for mode in modes:
                    one = {"size": size, "method": method, "views": k, "batch": batch, "mode": mode,
                           "reps": args.reps, "device": device}
                    if args.in_process:
                        res[mode] = run_one(**one)
                        gc.collect()
                    else:
                        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(one)], capture_output=True,
                                             text=True, check=True)
                        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
                    peaks[mode].append((batch, res[mode]["peak_mem_mb"]))
                base = res["nonprivate"]
                row = {"method": method, "views": k, "batch": batch, **{
                    f"{m}_{q}": res[m][q] for m in modes for q in ("time_s", "peak_mem_mb")}}
                for m in modes[1:]:
                    row[f"{m}_time_x"] = res[m]["time_s"] / base["time_s"]
                    row[f"{m}_mem_x"] = res[m]["peak_mem_mb"] / max(base["peak_mem_mb"], 1e-9)
                rows.append(row)
                print(f"{method:5s} k={k:<2d} B={batch:<2d} nonprivate {base['time_s']:7.3f} s {base['peak_mem_mb']:7.0f} MB"
                      + "".join(f" | {m} {row[f'{m}_time_x']:4.2f}x t {row[f'{m}_mem_x']:4.2f}x m" for m in modes[1:]),
                      flush=True)
            if args.fit_budget_gb and len(args.batch) >= 2:
                fit = {"method": method, "views": k, "budget_gb": args.fit_budget_gb}
                for m in modes:
                    (b1, p1), (b2, p2) = peaks[m][0], peaks[m][-1]
                    slope = (p2 - p1) / (b2 - b1)
                    fit[f"{m}_mb_per_example"] = slope
                    fit[f"{m}_max_batch"] = int((args.fit_budget_gb * 1024 - (p1 - slope * b1)) // slope) if slope > 0 else None
                fits.append(fit)
                print(f"{method:5s} k={k:<2d} largest batch in {args.fit_budget_gb:g} GB (linear fit of B={args.batch[0]},"
                      f"{args.batch[-1]}): " + ", ".join(f"{m} {fit[f'{m}_max_batch']}" for m in modes), flush=True)
    wall = time.perf_counter() - t_start
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "size": size,
            "spec": SIZES[size], "torch": torch.__version__, "reps": args.reps, "wall_s": wall,
            "threads": torch.get_num_threads(), "in_process": args.in_process, "clock": "wall" if device == "cuda" else "process CPU time",
            "memory": "CUDA allocator peak" if device == "cuda" else "CPU peak RSS growth over the timed steps",
            "target": "book_keeping <= 1.5x time and <= 1.3x memory of nonprivate (issue 16)",
            "batch_fit": "linear fit a + b*B of the measured peaks at the smallest and largest --batch"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "batch_fit": fits}, indent=2))
    print(f"wrote {args.json} ({wall:.0f} s)")


if __name__ == "__main__":
    main()

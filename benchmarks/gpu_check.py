"""One prepared GPU check: everything the few minutes of a lent GPU should measure, in one command.

With random weights at the real sizes, on the first CUDA device:
  1. VAR-d16 sampling, bf16, batch 32, cfg 1.5, top-k 900, top-p 0.96, decoded to 256x256 (arbooth's
     KV-cached `VAR.generate`): images/s; with `--official-var DIR` (a checkout of FoundationVision/VAR)
     the official `autoregressive_infer_cfg` at the same settings, in a subprocess (its build_vae_var
     replaces torch's layer initialisers process-wide);
  2. Infinity-2B at 1024x1024 (13 scales, cfg 4, blocks in bf16 as the release's inference, batch 1,
     KV cache, decoded): seconds per image;
  3. the ARBooth-2B training step (arbooth/recipes/train_subject.train_step: teacher, both forwards and
     backwards, two AdamW steps), full and LoRA r16, gradient checkpointing on, batch 2, 1024x1024: seconds
     per step and torch.cuda.max_memory_allocated next to the accounted peak of the same row in
     benchmarks/results/memory.json (benchmarks/memory.py; "-" when that row has not been accounted);
  4. the DP step against the non-private one (benchmarks/train_dp.run_one: VAR-d16, batch 8, k = 1 and 8
     views, FFT and LoRA; book-keeping one-backward and Opacus ghost clipping): time and the step's
     allocator peak above what the warm-up left, as ratios of non-private.
Each case is timed after one warm-up call, best of `--reps` (default 2). A case that fails (out of
memory, say) is recorded with its one-line error and the others still run. One table, and JSON:

    PYTHONPATH=. python benchmarks/gpu_check.py [--official-var ~/VAR] [--out benchmarks/results/gpu_check.json]

Expected duration on one H100 80GB (not yet run on one; from the accounted FLOPs at 40% of the bf16
rate and the models' build times): about 4 minutes, at most 8 -- VAR ~20 s (+~20 s official), Infinity-2B
~30 s, ARBooth full and LoRA ~40 s each (builds included), DP 12 configurations ~2 min.

Without CUDA the same code runs at tiny sizes on the CPU (`Sizes` TINY; tests/benchmarks/test_gpu_check.py),
so the script cannot rot between loans; `--tiny` forces that on a GPU machine too.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GiB = 2**30


@dataclass(frozen=True)
class Sizes:
    """What each check builds. REAL: the released sizes; TINY: the CPU smoke sizes."""

    name: str
    var: dict                  # {"vae": VQVAE kwargs, "var": VAR kwargs}
    var_batch: int
    infinity: dict             # {"vae": BSQVAE kwargs, "model": Infinity kwargs}
    infinity_pn: str
    infinity_scales: int | None = None  # the schedule's first scales only (tiny: the decoder dominates)
    arbooth: dict = field(default_factory=dict)  # extra memory.arbooth_step kwargs
    accounted: bool = True     # look the ARBooth rows up in memory.json (real sizes only)
    dp_size: str = "d16"       # benchmarks/train_dp.py SIZES key
    dp_batch: int = 8
    dp_cases: tuple[tuple[str, int], ...] = (("fft", 1), ("fft", 8), ("lora", 1), ("lora", 8))  # method, views


def real_sizes() -> Sizes:
    from arbooth.models.infinity import INFINITY_PRESETS
    from arbooth.models.var import VAE_PRESET, VAR_PRESETS
    return Sizes("real", {"vae": VAE_PRESET, "var": VAR_PRESETS[16]}, 32, INFINITY_PRESETS["infinity_2b"], "1M")


def tiny_sizes() -> Sizes:
    from arbooth.toy.tiny import TINY
    dp = _sibling("train_dp").SIZES["tiny"]
    var = {"vae": dp["vae"], "var": {**dp["var"], "patch_nums": dp["vae"]["patch_nums"]}}
    return Sizes("tiny", var, 4, {"vae": TINY["vae"], "model": TINY["model"]}, "0.06M", infinity_scales=3,
                 arbooth={"pn": "0.06M", "scales": 3, "infinity": TINY["model"], "vae": TINY["vae"]},
                 accounted=False, dp_size="tiny", dp_batch=2, dp_cases=(("fft", 1), ("lora", 8)))


def _sibling(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    key = f"benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # before exec: its dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules[key]


class Timer:
    """Best wall time of `reps` calls after one warm-up, synchronising the device around each."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def best(self, fn: Callable[[], object]) -> float:
        fn()
        best = float("inf")
        for _ in range(self.reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
        return best

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / GiB if self.device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ 1. VAR-d16 sampling
def check_var(sizes: Sizes, timer: Timer) -> list[dict]:
    from arbooth.models import VAR, VQVAE
    with timer.device:
        torch.manual_seed(0)
        var = VAR(VQVAE(**sizes.var["vae"]), **sizes.var["var"]).eval()
    labels = torch.arange(sizes.var_batch, device=timer.device) % var.num_classes
    secs = timer.best(lambda: var.generate(labels, cfg=1.5, top_k=900, top_p=0.96, seed=0, dtype="bf16", decode=True))
    return [{"check": "VAR-d16 sampling (arbooth)", "setting": f"bf16 B={sizes.var_batch} decoded",
             "value": sizes.var_batch / secs, "unit": "images/s"}]


def check_official_var(sizes: Sizes, official: str, timer: Timer) -> list[dict]:
    one = {"dir": official, "batch": sizes.var_batch, "reps": timer.reps, "vae": sizes.var["vae"],
           "var": sizes.var["var"]}
    out = subprocess.run([sys.executable, __file__, "--official-one", json.dumps(one)], check=False, capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"official VAR run failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    secs = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
    return [{"check": "VAR-d16 sampling (official)", "setting": f"bf16 B={sizes.var_batch} decoded",
             "value": sizes.var_batch / secs, "unit": "images/s"}]


def _official_one(one: dict) -> None:
    """In a subprocess: the official VAR (models.build_vae_var, random init) sampled as check_var does."""
    sys.path.insert(0, one["dir"])  # the official repo is a folder of top-level modules (models, dist)
    from models import build_vae_var  # the official checkout's
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    v, w = one["vae"], one["var"]
    _, var = build_vae_var(device=dev, patch_nums=tuple(v.get("patch_nums", (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))),
                           V=v["vocab_size"], Cvae=v["z_channels"], ch=v["ch"], share_quant_resi=v["share_quant_resi"],
                           num_classes=w.get("num_classes", 1000), depth=w["depth"])
    var.eval()
    labels = torch.arange(one["batch"], device=dev) % var.num_classes

    def sample():
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
            var.autoregressive_infer_cfg(B=one["batch"], label_B=labels, g_seed=0, cfg=1.5, top_k=900, top_p=0.96,
                                         more_smooth=False)
    print(json.dumps({"seconds": Timer(dev, one["reps"]).best(sample)}))


# ------------------------------------------------------------------ 2. Infinity-2B sampling
def check_infinity(sizes: Sizes, timer: Timer) -> list[dict]:
    from arbooth.models import BSQVAE, Infinity, infinity_scale_schedule
    with timer.device:
        torch.manual_seed(0)
        model = Infinity(BSQVAE(**sizes.infinity["vae"]).eval(), **sizes.infinity["model"]).eval()
    model.blocks.to(torch.bfloat16)  # as tools/run_infinity.py --bf16 1
    schedule = infinity_scale_schedule(1.0, sizes.infinity_pn)[:sizes.infinity_scales]
    text = torch.randn(1, 32, model.text_channels, device=timer.device)
    mask = torch.ones(1, 32, dtype=torch.bool, device=timer.device)
    timer.reset_peak()
    secs = timer.best(lambda: model.generate(text, mask, schedule, cfg=4.0, seed=0))
    side = schedule[-1][1] * model.vae.token_stride
    return [{"check": "Infinity-2B sampling", "setting": f"{side}x{side} bf16 cfg 4 B=1", "value": secs,
             "unit": "s/image", "max_allocated_gib": timer.peak_gib()}]


# ------------------------------------------------------------------ 3. ARBooth-2B step
def check_arbooth(sizes: Sizes, timer: Timer, method: str, accounted: dict[str, dict]) -> list[dict]:
    memory = _sibling("memory")
    row = f"arbooth_2b {method}{' r16' if method == 'lora' else ''} ckpt=on B=2"
    step = memory.arbooth_step(method=method, checkpointing=True, batch=2, fake=False, device=str(timer.device),
                               **sizes.arbooth)
    timer.reset_peak()
    secs = timer.best(lambda: step.run(lambda phase: None))
    peak = timer.peak_gib()
    acc = accounted.get(row) if sizes.accounted else None
    return [{"check": f"ARBooth-2B step {method}", "setting": "ckpt on B=2 1024x1024" if sizes.accounted else "tiny",
             "value": secs, "unit": "s/step", "max_allocated_gib": peak,
             "accounted_gib": None if acc is None else acc["peak_gib"], "accounted_row": row,
             "predicted_h100_s": None if acc is None else acc["h100_step_s_at_40pct"]}]


# ------------------------------------------------------------------ 4. DP step vs non-private
def check_dp(sizes: Sizes, timer: Timer) -> list[dict]:
    train_dp, rows = _sibling("train_dp"), []
    for method, views in sizes.dp_cases:
        res = {}
        for mode in ("nonprivate", "book_keeping", "ghost"):
            res[mode] = train_dp.run_one(sizes.dp_size, method, views, sizes.dp_batch, mode, timer.reps,
                                         str(timer.device))
            _free(timer.device)
        base = res["nonprivate"]
        for mode in ("book_keeping", "ghost"):
            rows.append({"check": f"DP {mode} / nonprivate", "setting": f"{method} k={views} B={sizes.dp_batch}",
                         "value": res[mode]["time_s"] / base["time_s"], "unit": "x time",
                         "memory_x": res[mode]["peak_mem_mb"] / max(base["peak_mem_mb"], 1e-9),
                         "nonprivate_s": base["time_s"], "nonprivate_peak_mb": base["peak_mem_mb"]})
    return rows


# ------------------------------------------------------------------ the check
def run_checks(sizes: Sizes, device: torch.device, reps: int, official_var: str | None,
               memory_json: Path) -> dict:
    timer = Timer(device, reps)
    accounted = {}
    if sizes.accounted and memory_json.is_file():
        accounted = {r["name"]: r for r in json.loads(memory_json.read_text())["rows"]}
    checks: list[tuple[str, Callable[[], list[dict]]]] = [("var", lambda: check_var(sizes, timer))]
    if official_var:
        checks.append(("official_var", lambda: check_official_var(sizes, official_var, timer)))
    checks += [("infinity", lambda: check_infinity(sizes, timer)),
               ("arbooth_full", lambda: check_arbooth(sizes, timer, "full", accounted)),
               ("arbooth_lora", lambda: check_arbooth(sizes, timer, "lora", accounted)),
               ("dp", lambda: check_dp(sizes, timer))]
    rows, walls, t_all = [], {}, time.perf_counter()
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            rows += fn()
        except Exception as e:  # noqa: BLE001 (a lent GPU's minutes are few: record it, run the other checks)
            rows.append({"check": name, "setting": "", "value": None, "unit": "", "error": f"{type(e).__name__}: {e}"})
        _free(device)  # the check's models went with its frame
        walls[name] = time.perf_counter() - t0
        print(f"[{name}: {walls[name]:.0f} s]", flush=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "sizes": asdict(sizes), "reps": reps, "wall_s": time.perf_counter() - t_all,
            "check_wall_s": walls, "memory_json": str(memory_json) if accounted else None,
            "timing": "best wall time of reps after one warm-up (DP: median, train_dp.run_one)"}
    return {"meta": meta, "rows": rows}


def _fmt(x, spec: str) -> str:
    return "-".rjust(int(spec.split(".")[0])) if x is None else format(x, spec)


def print_table(result: dict) -> None:
    print(f"{'check':30s} {'setting':26s} {'value':>9s} {'unit':9s} {'max alloc GiB':>13s} {'accounted GiB':>13s}"
          f" {'mem x':>6s}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['check']:30s} FAILED: {r['error']}")
            continue
        print(f"{r['check']:30s} {r['setting']:26s} {_fmt(r['value'], '9.3f')} {r['unit']:9s} "
              f"{_fmt(r.get('max_allocated_gib'), '13.2f')} {_fmt(r.get('accounted_gib'), '13.2f')} "
              f"{_fmt(r.get('memory_x'), '6.2f')}")
    m = result["meta"]
    print(f"{m['device']}, {m['sizes']['name']} sizes, {m['wall_s']:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-var", help="a checkout of github.com/FoundationVision/VAR: time its sampler too")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes even with CUDA (what runs without it)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--memory-json", type=Path, default=HERE / "results" / "memory.json")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    ap.add_argument("--official-one", help=argparse.SUPPRESS)  # internal: the official VAR in a subprocess
    a = ap.parse_args()
    if a.official_one:
        _official_one(json.loads(a.official_one))
        return
    cuda = torch.cuda.is_available() and not a.tiny
    sizes = real_sizes() if cuda else tiny_sizes()
    result = run_checks(sizes, torch.device("cuda" if cuda else "cpu"), a.reps, a.official_var, a.memory_json)
    print_table(result)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

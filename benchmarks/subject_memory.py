"""Peak memory of one ARBooth training step at Infinity-2B width and 1024x1024 (13 scales), measured
without a GPU: the process's peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs)
while the real step runs on the CPU (the same code as on a GPU: bf16 blocks under bf16 autocast,
gradient checkpointing, the KV-cached teacher, bitwise self-correction, two stochastic-rounding AdamW
steps), above what the process held before the model was built. Each phase of the step (teacher
sampling; instance forward; its backward + update; distillation forward; its backward + update) gets
its own peak, since each peaks on something else. Every block costs the same, so each phase's peak is
linear in depth: a few depths are run, each in a fresh process (freed memory stays resident in a
process) with glibc returning every allocation over 64 KiB when freed; each phase's line is
extrapolated to the 32 blocks of Infinity-2B, the BSQ-VAE's weights (built before the baseline) are
added, and the largest phase is the step's peak.

    PYTHONPATH=. python benchmarks/subject_memory.py [--depths 1 2] [--batch 2] [--out ...]
    PYTHONPATH=. python benchmarks/subject_memory.py --method lora --rank 16 [--no-checkpointing] --out ...
    PYTHONPATH=. python benchmarks/subject_memory.py --file-size --method lora --rank 16   # exact file size, seconds

The same run counts the step's floating-point operations (torch's FlopCounterMode: matmuls and
attention), fits them linearly in depth too, and models the 2B step time on a GPU from an assumed
throughput (--gpu-tflops, --mfu): a model, not a measurement.

What this does not see: the CUDA caching allocator's fragmentation and workspaces, the CUDA context
(~0.5 GB), and kernels that differ between CPU and GPU (SDPA picks its backend per device; CPU
autocast casts a few ops differently). Read the result as the tensor memory the step needs; the GPU
benchmark (`benchmarks/train_subject.py --size 2b`) measures the real peak when a GPU is lent.
Random text features stand in for T5 and random VAE features for the photos (both are computed once
at setup and then freed). About 4 min per block and step on 2 CPU cores: 25 min with the defaults,
35 with the operation count (--pn 0.06M for a quick look).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from arbooth.adapt.subject_token import SubjectToken
from arbooth.config import to_dict
from arbooth.models import BSQVAE, Infinity, infinity_scale_schedule
from arbooth.recipes.subject_config import SubjectTrainConfig, TuningConfig
from arbooth.recipes.train_subject import Run, build_optimizer, build_tuner, train_step
from arbooth.subject_bases import ModelConfig

GiB = 2**30
FULL_DEPTH = 32  # Infinity-2B


def _status_gib(key: str) -> float:
    kb = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(kb.group(1)) / 2**20


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


def _cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)  # the full L x L, as the GPU's masked kernels compute too


def _cpu_sdpa_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


# torch counts the GPU attention kernels; the CPU's are counted with the same formulas
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}


class PhasePeaks:
    """train_step's `on_phase` probe: the peak resident memory above `base` in each phase (max over steps).
    The phases peak on different things (the teacher on its KV cache, the backward passes on the
    checkpointed activations, the updates on the gradients), so each gets its own line in depth."""

    def __init__(self, base: float) -> None:
        self.base, self.phase, self.peaks = base, "", {}

    def __call__(self, phase: str) -> None:
        self.close()
        self.phase = phase
        _reset_peak()

    def close(self) -> None:
        if self.phase:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), _status_gib("VmHWM") - self.base)
        self.phase = ""


class PhaseFlops:
    """train_step's `on_phase` probe under a FlopCounterMode: the operations of each phase of one step."""

    def __init__(self, counter: FlopCounterMode) -> None:
        self.counter, self.phase, self.start, self.flops = counter, "", 0, {}

    def __call__(self, phase: str) -> None:
        self.close()
        self.phase, self.start = phase, self.counter.get_total_flops()

    def close(self) -> None:
        if self.phase:
            self.flops[self.phase] = (self.counter.get_total_flops() - self.start) / 1e12
        self.phase = ""


def measure(depth: int, batch: int, steps: int, vae: BSQVAE, pn: str, count_flops: bool, *, method: str = "full",
            rank: int = 16, checkpointing: bool = True) -> dict:
    cfg = SubjectTrainConfig(subject="-", model=ModelConfig(pn=pn, tuned_dtype="bf16"), dtype="bf16",
                             device="cpu", batch_size=batch, validate_every=0, gradient_checkpointing=checkpointing,
                             tuning=TuningConfig(method=method, lora_rank=rank))
    schedule = [tuple(s) for s in infinity_scale_schedule(1.0, pn)]
    gc.collect()
    base = _status_gib("VmRSS")
    _reset_peak()
    torch.manual_seed(0)
    model = Infinity(vae, depth=depth, block_chunks=1, gradient_checkpointing=checkpointing)  # 2B width, heads, text channels
    model.blocks.to(torch.bfloat16)
    tuner = build_tuner(model, cfg.tuning)
    token = SubjectToken(cfg.tuning.text_prefix_length, model.text_channels)
    opt = build_optimizer(cfg, token, tuner, torch.device("cpu"))
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
    times, probe = [], PhasePeaks(base)
    for _ in range(steps):  # the first step allocates the optimizer states, later ones run with them
        t0 = time.perf_counter()
        train_step(run, torch.arange(batch), on_phase=probe)
        probe.close()
        times.append(time.perf_counter() - t0)
    row = {}
    if count_flops:  # one more step (the counter's module hooks hold memory, so not while measuring it)
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as flops:
            phase_flops = PhaseFlops(flops)
            train_step(run, torch.arange(batch), on_phase=phase_flops)
            phase_flops.close()
        row["step_tflop"] = flops.get_total_flops() / 1e12
        row["phase_tflop"] = phase_flops.flops
    mem = tuner.teacher_memory()
    row |= {"depth": depth, "batch": batch, "tokens": _tokens(pn), "method": method, "rank": rank,
            "checkpointing": checkpointing, "step_s": times[-1],
            "peak_gib": max(probe.peaks.values()), "phase_peak_gib": probe.peaks, "held_before_step_gib": held,
            "trainable": tuner.num_trainable(), "teacher_originals_gib": mem["teacher_bytes"] / GiB}
    return row


def personalization_file_bytes(method: str, rank: int, depth: int = FULL_DEPTH, lora_file_dtype: str = "bf16") -> dict:
    """Exact size of the personalization file of Infinity-2B (depth 32) for `method`: the model is built on
    the meta device (no memory); LoRA: the adapter tensors (fp32, shapes from the meta layers) are made
    for real (tens of MB) and the file is written and measured; full: the tuned tensors' bytes (bf16, as
    the recipe stores them) plus <S*> and the header, counted from the shapes (writing 3 GB is pointless)."""
    import tempfile

    from arbooth.adapt.personalization import save_personalization
    from arbooth.adapt.selective import CROSS_ATTENTION, FFN, tuned_parameter_names
    from arbooth.adapt.subject_lora import LoRASpec, lora_metadata, lora_targets
    with torch.device("meta"):
        vae = BSQVAE()
        model = Infinity(vae, depth=depth, block_chunks=1)
    kinds = (CROSS_ATTENTION, FFN)
    cfg = SubjectTrainConfig(subject="-", tuning=TuningConfig(method=method, lora_rank=rank,
                                                              lora_file_dtype=lora_file_dtype))
    meta = {"config": json.dumps(to_dict(cfg)), "base_model": "infinity_2b_reg.pth sha256=" + "0" * 64,
            "step": "500", "placeholder": "<S*>", "class_noun": "dog", "instance_template": "a photo of {token} {cls}"}
    token = torch.zeros(cfg.tuning.text_prefix_length, model.text_channels)
    modules = dict(model.named_modules())
    if method == "lora":
        spec = LoRASpec(rank, 2.0 * rank, lora_targets(model, kinds))
        tensors = {}
        for t in spec.targets:
            lin = modules[t]
            dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.tuning.lora_file_dtype]
            tensors[f"{t}.lora_A.weight"] = torch.zeros(rank, lin.in_features, dtype=dt)
            tensors[f"{t}.lora_B.weight"] = torch.zeros(lin.out_features, rank, dtype=dt)
        with tempfile.TemporaryDirectory() as d:
            path = save_personalization(Path(d) / "p.safetensors", tensors, token, base_tuned_sha256="0" * 64,
                                        metadata={**meta, **lora_metadata(spec, torch.bfloat16)})
            size = path.stat().st_size
        return {"method": method, "rank": rank, "adapter_dtype": lora_file_dtype, "tensors": len(tensors) + 1, "parameters":
                sum(v.numel() for v in tensors.values()) + token.numel(), "file_bytes": size}
    params = dict(model.named_parameters())
    names = tuned_parameter_names(model, kinds)
    n = sum(params[k].numel() for k in names)
    # header: the same entries for meta-shaped tensors, measured on a file of one-element stand-ins
    stand_in = {k: torch.zeros(1, dtype=torch.bfloat16) for k in names}
    with tempfile.TemporaryDirectory() as d:
        path = save_personalization(Path(d) / "p.safetensors", stand_in, token, base_tuned_sha256="0" * 64,
                                    metadata={**meta, "kind": "full"})
        header = path.stat().st_size - 2 * len(names) - token.numel() * 4
    return {"method": method, "tensors": len(names) + 1, "parameters": n + token.numel(),
            "file_bytes": header + 2 * n + 4 * token.numel(), "header_bytes_approx": header}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2],
                    help="model depths to measure (at least two; more checks the linearity)")
    ap.add_argument("--batch", type=int, default=2, help="photos per step (the 2B default is 2)")
    ap.add_argument("--pn", default="1M", help="resolution (Infinity's pn: 1M = 1024x1024, the 2B default)")
    ap.add_argument("--steps", type=int, default=2,
                    help="steps per depth the peaks are taken over (from the second on, every phase runs with "
                         "the optimizer states allocated)")
    ap.add_argument("--count-flops", action=argparse.BooleanOptionalAction, default=True,
                    help="run one more step per depth under torch's FlopCounterMode")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/subject_memory.json")
    ap.add_argument("--gpu-tflops", type=float, default=989.0,
                    help="dense bf16 TFLOP/s of the GPU the step time is modelled for (H100 SXM: 989)")
    ap.add_argument("--mfu", type=float, default=0.4, help="fraction of --gpu-tflops assumed reached")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a previous result JSON: its rows for the same --pn and --batch are kept, only the other "
                         "depths are run")
    ap.add_argument("--method", choices=("full", "lora"), default="full", help="tuning.method")
    ap.add_argument("--rank", type=int, default=16, help="tuning.lora_rank (lora)")
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="gradient checkpointing of the blocks (the recipe's default: on)")
    ap.add_argument("--lora-file-dtype", choices=("bf16", "fp32"), default="bf16", help="with --file-size")
    ap.add_argument("--file-size", action="store_true",
                    help="only print the exact personalization-file size at 2B for --method/--rank (meta device)")
    ap.add_argument("--one-depth", type=int, default=0, help=argparse.SUPPRESS)  # the per-depth child process
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.file_size:
        r = personalization_file_bytes(a.method, a.rank, lora_file_dtype=a.lora_file_dtype)
        print(json.dumps(r))
        print(f"{a.method}{f' r={a.rank}' if a.method == 'lora' else ''}: {r['parameters']:,} parameters in "
              f"{r['tensors']} tensors, file {r['file_bytes']:,} bytes = {r['file_bytes'] / 1e6:.1f} MB "
              f"({r['file_bytes'] / 2**20:.1f} MiB)")
        return
    if a.one_depth:
        torch.manual_seed(0)
        vae = BSQVAE().eval().requires_grad_(False)  # the d32 VAE of Infinity-2B, random weights
        row = measure(a.one_depth, a.batch, a.steps, vae, a.pn, a.count_flops, method=a.method, rank=a.rank,
                      checkpointing=a.checkpointing)
        row["vae_gib"] = sum(p.numel() * p.element_size() for p in vae.parameters()) / GiB
        print(json.dumps(row))
        return
    if len(set(a.depths)) < 2:
        ap.error("--depths needs at least two different depths to extrapolate")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    old = json.loads(a.reuse.read_text())["rows"] if a.reuse else []
    old = {r["depth"]: r for r in old if r["tokens"] == _tokens(a.pn) and r["batch"] == a.batch
           and ("step_tflop" in r or not a.count_flops) and r.get("method", "full") == a.method
           and r.get("rank", 16) == a.rank and r.get("checkpointing", True) == a.checkpointing}
    rows = []
    for depth in sorted(set(a.depths)):
        if depth in old:
            rows.append(old[depth])
            continue
        cmd = [sys.executable, __file__, "--one-depth", str(depth), "--batch", str(a.batch), "--steps", str(a.steps),
               "--threads", str(a.threads), "--pn", a.pn, "--method", a.method, "--rank", str(a.rank),
               "--checkpointing" if a.checkpointing else "--no-checkpointing",
               "--count-flops" if a.count_flops else "--no-count-flops"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"depth {depth} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"depth {depth}: peak {r['peak_gib']:.2f} GiB, step {r['step_s']:.0f} s", flush=True)
        partial = Path(a.out).with_suffix(".partial.json")  # rows so far (a later --reuse picks them up)
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"rows": rows}, indent=1))
    vae_gib = rows[0]["vae_gib"]
    phases = {}  # phase -> (intercept, per block, residual, extrapolated)
    for ph in rows[0]["phase_peak_gib"]:
        c0, c1, res = _line([{"depth": r["depth"], "y": r["phase_peak_gib"][ph]} for r in rows], "y")
        phases[ph] = (c0, c1, res, c0 + c1 * FULL_DEPTH + vae_gib)
    worst = max(phases, key=lambda ph: phases[ph][3])
    total = phases[worst][3]
    est = {"method": a.method, "rank": a.rank, "checkpointing": a.checkpointing, "vae_gib": vae_gib, "phases": {ph: dict(zip(("rest_gib", "per_block_gib", "fit_max_residual_gib",
                                                         f"peak_gib_depth{FULL_DEPTH}"), v, strict=True))
                                          for ph, v in phases.items()},
           "peak_phase": worst, f"peak_gib_depth{FULL_DEPTH}": total}
    print("depth | tokens | batch | step_s (CPU) | held before step GiB | peak GiB | " +
          " | ".join(f"{ph} GiB" for ph in phases) + (" | step TFLOP" if a.count_flops else ""))
    for r in rows:
        print(f"{r['depth']} | {r['tokens']} | {r['batch']} | {r['step_s']:.1f} | {r['held_before_step_gib']:.3f} | "
              f"{r['peak_gib']:.3f} | " + " | ".join(f"{r['phase_peak_gib'][ph]:.3f}" for ph in phases) +
              (f" | {r['step_tflop']:.1f}" if a.count_flops else ""))
    for ph, (c0, c1, res, ext) in phases.items():
        print(f"{ph:>15}: {c0:.3f} GiB + {c1:.3f} GiB per block (fit residual {res:.4f}) -> {FULL_DEPTH} blocks "
              f"+ the VAE ({vae_gib:.2f} GiB): {ext:.2f} GiB")
    print(f"peak of the step at {FULL_DEPTH} blocks: {total:.2f} GiB of tensors, in phase {worst!r}")
    if a.count_flops:
        fl0, fl1, _ = _line(rows, "step_tflop")
        tflop = fl0 + fl1 * FULL_DEPTH
        step_s = tflop / (a.gpu_tflops * a.mfu)
        est |= {f"step_tflop_depth{FULL_DEPTH}": tflop, "gpu_tflops": a.gpu_tflops, "mfu": a.mfu,
                "modelled_step_s": step_s, "modelled_500_steps_min": step_s * 500 / 60}
        if all("phase_tflop" in r for r in rows):
            est["phase_tflop_depth32"] = {}
            for ph in rows[0]["phase_tflop"]:
                p0, p1, _ = _line([{"depth": r["depth"], "y": r["phase_tflop"].get(ph, 0.0)} for r in rows], "y")
                est["phase_tflop_depth32"][ph] = p0 + p1 * FULL_DEPTH
                print(f"{ph:>15}: {p0 + p1 * FULL_DEPTH:.0f} TFLOP at {FULL_DEPTH} blocks")
        print(f"compute: {fl0:.1f} + {fl1:.1f} TFLOP per block; {FULL_DEPTH} blocks: {tflop:.0f} TFLOP per step; at "
              f"{a.mfu:.0%} of {a.gpu_tflops:.0f} TFLOP/s that is {step_s:.2f} s per step, "
              f"{step_s * 500 / 60:.1f} min for 500 steps (a model, not a measurement)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"rows": rows, "estimate": est}, indent=1))

def _tokens(pn: str) -> int:
    return sum(h * w for _, h, w in infinity_scale_schedule(1.0, pn))


def _line(rows: list[dict], key: str) -> tuple[float, float, float]:
    """Least-squares line through (depth, rows[key]): intercept, slope, largest residual."""
    d = torch.tensor([r["depth"] for r in rows], dtype=torch.float64)
    y = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    A = torch.stack([torch.ones_like(d), d], 1)
    coef = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1)
    return float(coef[0]), float(coef[1]), float((A @ coef - y).abs().max())

if __name__ == "__main__":
    main()

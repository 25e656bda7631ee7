"""Ablation of the ARBooth recipe on the toy base and demo subject (docs/toy.md).

Variants: the full recipe (configs/subject/toy.yaml: cross-attention + FFN + <S*>, scale-weighted loss,
prior distillation) against no scale weighting, no prior distillation, all-layer tuning, and
self-attention tuning (self-attention + <S*> instead of cross-attention + FFN), LoRA at rank 4 / 16 / 64
and a teacher bank of 16. Each variant trains with the same training seeds; each run is scored
by the toy evaluators over 4 sampling seeds. Prints two Markdown tables and writes JSON: mean ± std
across training seeds per metric, and per variant the paired difference to the full recipe (same
training seed) with a 95% bootstrap interval of the mean difference and a paired t-test p-value.

    python benchmarks/toy_ablation.py                      # 5 seeds, the config's steps
    python benchmarks/toy_ablation.py --seeds 0 1 --steps 100 --out benchmarks/results/toy_ablation.json
    # on 2 cores: two processes on different seeds, then one table from both
    python benchmarks/toy_ablation.py --seeds 0 1 2 --out a.json & python benchmarks/toy_ablation.py --seeds 3 4 --out b.json
    python benchmarks/toy_ablation.py --merge a.json b.json --out benchmarks/results/toy_ablation.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arbooth.adapt.personalization import load_personalization
from arbooth.config import load_config
from arbooth.metrics.paired import paired_difference
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_subject import train
from arbooth.toy.report import toy_report

VARIANTS = {
    "full": [],
    "no_scale_weighting": ["loss.scale_weights=[1.0,1.0,1.0,1.0,1.0]"],
    "no_prior": ["loss.prior=false"],
    "all_layers": ["tuning.all_layers=true"],
    "self_attention": ["tuning.self_attention=true", "tuning.cross_attention=false", "tuning.ffn=false"],
    # LoRA on the same sub-layers (issue 15); alpha = 2 x rank by default
    "lora_r4": ["tuning.method=lora", "tuning.lora_rank=4"],
    "lora_r16": ["tuning.method=lora", "tuning.lora_rank=16"],
    "lora_r64": ["tuning.method=lora", "tuning.lora_rank=64"],
    "teacher_bank16": ["teacher.bank_size=16"],
}
COLUMNS = ("subject_acc", "background_acc", "class_subject_leak", "class_shape_acc", "I_ID", "T_CLIP", "PRES", "DIV",
           "class_drift_id")
TESTED = ("subject_acc", "background_acc", "class_subject_leak", "I_ID", "T_CLIP", "PRES")


def run_one(name: str, seed: int, steps: int | None, work: Path, extra: tuple[str, ...] = ()) -> dict:
    overrides = [*extra, *VARIANTS[name], f"seed={seed}", f"out_dir={work / f'{name}_s{seed}'}", "overwrite=true",
                 f"subject={ROOT / 'subjects' / 'toy_star'}"]
    if steps is not None:
        overrides.append(f"steps={steps}")
    cfg = load_config(SubjectTrainConfig, ROOT / "configs" / "subject" / "toy.yaml", overrides)
    t0 = time.perf_counter()
    path = train(cfg)
    seconds = time.perf_counter() - t0
    m = toy_report(cfg.subject, path, cfg.out_dir, guidance=cfg.validation_guidance, tau=cfg.validation_tau, grid=False)
    pers = load_personalization(path)
    params = sum(v.numel() for v in pers.tensors.values()) + pers.subject_token_PC.numel()
    return {"variant": name, "seed": seed, "train_seconds": seconds, "trainable_params": params,
            "personalized": m["personalized"]["mean"], "base": m["base"]["mean"]}


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs: list[dict]) -> str:
    head = "| variant | " + " | ".join(COLUMNS) + " | trainable params | train time (s) |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    base = runs[0]["base"]
    lines.append("| base model (no tuning) | " + " | ".join(f"{base.get(c, float('nan')):.3f}" if c != "class_drift_id"
                                                          else "0" for c in COLUMNS) + " | 0 | - |")
    for name in VARIANTS:
        rs = [r for r in runs if r["variant"] == name]
        if not rs:
            continue
        cells = [_fmt([r["personalized"][c] for r in rs]) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rs[0]['trainable_params']:,} | "
                     + _fmt([r["train_seconds"] for r in rs]) + " |")
    return "\n".join(lines)


def paired(full: list[float], other: list[float], n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean of other - full (paired by training seed), its 95% bootstrap interval and the paired t-test p
    (arbooth.metrics.paired, shared with `arbooth bench-subject`)."""
    return paired_difference(full, other, n_boot=n_boot, seed=seed)


def differences(runs: list[dict]) -> tuple[dict, str]:
    """Paired differences to `full` per variant and metric, and their Markdown table."""
    full = {r["seed"]: r for r in runs if r["variant"] == "full"}
    out, lines = {}, ["| variant - full | " + " | ".join(TESTED) + " |", "|" + "---|" * (len(TESTED) + 1)]
    for name in VARIANTS:
        rs = [r for r in runs if r["variant"] == name and r["seed"] in full]
        if name == "full" or len(rs) < 2:
            continue
        out[name] = {c: paired([full[r["seed"]]["personalized"][c] for r in rs], [r["personalized"][c] for r in rs])
                     for c in TESTED}
        lines.append(f"| {name} | " + " | ".join(
            f"{v['mean']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] p={v['p']:.2f}" for v in out[name].values()) + " |")
    return out, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--work", default="runs/toy_ablation")
    ap.add_argument("--out", default="benchmarks/results/toy_ablation.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides for every variant (before the variant's own)")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="train nothing: one table from the runs of these JSON files (e.g. seeds run in parallel)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs, t0 = [], time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        unique = {}  # (variant, seed) -> run; a pair run twice keeps its first run
        for r in (r for part in parts for r in part["runs"]):
            unique.setdefault((r["variant"], r["seed"]), r)
        runs = sorted(unique.values(), key=lambda r: (r["seed"], list(VARIANTS).index(r["variant"])))
        diffs, diff_table = differences(runs)
        seeds = sorted({r["seed"] for r in runs})
        out.write_text(json.dumps({"seeds": seeds, "steps": parts[0]["steps"], "threads": parts[0]["threads"],
                                   "wall_seconds": max(p["wall_seconds"] for p in parts), "merged_from": [str(p) for p in args.merge],
                                   "runs": runs, "table": table(runs), "differences": diffs,
                                   "difference_table": diff_table}, indent=1) + "\n")
        print(table(runs), "\n", diff_table, f"\nwrote {out}", sep="\n")
        return
    for seed in args.seeds:  # seed-major: a run stopped early still has paired seeds for every variant
        for name in args.variants:
            runs.append(run_one(name, seed, args.steps, Path(args.work), tuple(args.set)))
            runs[-1]["set"] = list(args.set)
            r = runs[-1]["personalized"]
            print(f"{name} seed {seed}: subject_acc {r['subject_acc']:.2f} background_acc {r['background_acc']:.2f} "
                  f"leak {r['class_subject_leak']:.2f} ({runs[-1]['train_seconds']:.0f} s)", flush=True)
            diffs, diff_table = differences(runs)
            out.write_text(json.dumps({"seeds": args.seeds, "steps": args.steps, "threads": args.threads,
                                       "wall_seconds": time.perf_counter() - t0, "runs": runs, "table": table(runs),
                                       "differences": diffs, "difference_table": diff_table}, indent=1) + "\n")
    print(table(runs))
    print()
    print(differences(runs)[1])
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

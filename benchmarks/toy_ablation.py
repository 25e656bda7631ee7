"""Ablation of the ARBooth recipe on the toy base and demo subject (docs/toy.md).

Variants: the full recipe (configs/subject/toy.yaml: cross-attention + FFN + <S*>, scale-weighted loss,
prior distillation) against no scale weighting, no prior distillation, all-layer tuning, and
self-attention tuning (self-attention + <S*> instead of cross-attention + FFN). Each variant trains
with several seeds; each run is scored by the toy evaluators over 4 sampling seeds. Prints a Markdown
table (mean ± std across training seeds) and writes JSON.

    python benchmarks/toy_ablation.py                      # 3 seeds, the config's steps
    python benchmarks/toy_ablation.py --seeds 0 1 --steps 100 --out benchmarks/results/toy_ablation.json
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
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_subject import train
from arbooth.toy.report import toy_report

VARIANTS = {
    "full": [],
    "no_scale_weighting": ["loss.scale_weights=[1.0,1.0,1.0,1.0,1.0]"],
    "no_prior": ["loss.prior=false"],
    "all_layers": ["tuning.all_layers=true"],
    "self_attention": ["tuning.self_attention=true", "tuning.cross_attention=false", "tuning.ffn=false"],
}
COLUMNS = ("I_ID", "I_CLIP", "T_CLIP", "PRES", "DIV", "texture_acc", "colour_acc", "class_drift_id")


def run_one(name: str, seed: int, steps: int | None, work: Path) -> dict:
    overrides = [*VARIANTS[name], f"seed={seed}", f"out_dir={work / f'{name}_s{seed}'}",
                 f"subject={ROOT / 'subjects' / 'toy_star'}"]
    if steps is not None:
        overrides.append(f"steps={steps}")
    cfg = load_config(SubjectTrainConfig, ROOT / "configs" / "subject" / "toy.yaml", overrides)
    t0 = time.perf_counter()
    path = train(cfg)
    seconds = time.perf_counter() - t0
    m = toy_report(cfg.subject, path, cfg.out_dir, cfg=cfg.val_cfg, tau=cfg.val_tau, grid=False)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--work", default="runs/toy_ablation")
    ap.add_argument("--out", default="benchmarks/results/toy_ablation.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for name in args.variants:
        for seed in args.seeds:
            runs.append(run_one(name, seed, args.steps, Path(args.work)))
            r = runs[-1]
            print(f"{name} seed {seed}: I_ID {r['personalized']['I_ID']:.3f} PRES {r['personalized']['PRES']:.3f} "
                  f"({r['train_seconds']:.0f} s)", flush=True)
    print(table(runs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seeds": args.seeds, "steps": args.steps, "threads": args.threads,
                               "runs": runs, "table": table(runs)}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The class-conditional paper's Tables 1-3 and 10 in miniature, on the shipped tiny VAR and the toy worlds.

Parts (each cell trains with several seeds and is scored by the toy extractor; mean ± std over seeds):
- methods: FID, precision, recall, trainable parameters and training PFLOPs (arbooth profile's counter,
  transformer forward + backward per micro-step x micro-steps) of FFT, LoRA, LNTuning, LoRA on attention
  only and LoRA on the MLP only, per downstream dataset (Tables 1-3);
- dp: DP-LoRA FID at epsilon 1, 10, 100, 1000 on new_colours (Table 3's private rows);
- k: augmentation multiplicity k = 1 vs k = 8 at epsilon 10, with the ratio of training times (Table 10).
Every run has the same number of optimizer steps and the same (expected) batch. Results are written
after every cell (a rerun with the same --out skips cells already there), then printed as Markdown.

    python benchmarks/toy_class_table.py                                  # everything, 3 seeds
    python benchmarks/toy_class_table.py --parts methods --seeds 0 --steps 30
    python benchmarks/toy_class_table.py --parts dp k --out a.json        # parts in parallel processes,
    python benchmarks/toy_class_table.py --combine a.json b.json          # then one table (writes --out)
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

from arbooth.commands.profile import profile_step
from arbooth.jobs.toy_class import base_var, finetune, toy_class_config, toy_data, toy_dp_config
from arbooth.toy.class_eval import ToyClassEvaluator
from arbooth.toy.class_var import load_toy_extractor

METHODS = ("fft", "lora", "lntuning", "lora_attn", "lora_mlp")
WORLDS = ("new_colours", "new_shapes")
EPSILONS = (1, 10, 100, 1000)


def _stats(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def _fmt(s: dict | None, spec: str = ".2f") -> str:
    if not s:
        return "-"
    return f"{s['mean']:{spec}} ± {s['std']:{spec}}" if s["n"] > 1 else f"{s['mean']:{spec}}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["methods", "dp", "k"], choices=["methods", "dp", "k"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--work", default="runs/toy_class_table", help="datasets and run folders")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "toy_class_table.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps-k", type=int, default=None, help="optimizer steps of the k = 1 / k = 8 part")
    ap.add_argument("--combine", nargs="+", help="merge these result files into --out and print the table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        res = {"cells": {k: v for r in parts for k, v in r["cells"].items()},
               "config": {"parts": [r["config"] for r in parts]},
               "wall_seconds": sum(r.get("wall_seconds_this_run", 0) for r in parts)}
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(markdown(res))
        return 0
    res = json.loads(out.read_text()) if out.is_file() else {}
    res.setdefault("cells", {})
    res["config"] = {"steps": args.steps, "seeds": args.seeds, "batch_size": 16, "threads": args.threads,
                     "command": " ".join(["python", *sys.argv])}
    t_all = time.perf_counter()
    extractor = load_toy_extractor()

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        res["wall_seconds_this_run"] = round(time.perf_counter() - t_all, 1)
        out.write_text(json.dumps(res, indent=1) + "\n")

    def cell(key: str, make_cfg, evaluator, data) -> None:
        if key in res["cells"]:
            return
        runs = []
        for s in args.seeds:
            cfg = make_cfg(s)
            runs.append(finetune(cfg, evaluator, sampling_seed=0))
            print(f"{key} seed {s}: fid {runs[-1]['fid']:.2f}  {runs[-1]['train_seconds']:.0f}s", flush=True)
        res["cells"][key] = {"runs": runs, **{m: _stats([r[m] for r in runs]) for m in
                                              ("fid", "precision", "recall", "train_seconds")},
                             "trainable_params": runs[0]["trainable_params"]}
        save()

    for world in args.worlds if ("methods" in args.parts) else []:
        data = toy_data(work / "data", world)
        ev = ToyClassEvaluator(data / "test", extractor)
        n = sum(1 for _ in (data / "train").rglob("*.png"))
        key = f"base/{world}"
        if key not in res["cells"]:
            base = base_var(toy_class_config(data, work / "unused"))
            runs = [ev.evaluate(base, seed=s) for s in args.seeds]
            res["cells"][key] = {"runs": runs, **{m: _stats([r[m] for r in runs]) for m in ("fid", "precision",
                                                                                           "recall")}}
            save()
        for method in args.methods:
            def make(s, method=method, data=data, world=world):
                return toy_class_config(data, work / world / method / f"s{s}", method, steps=args.steps, seed=s)
            cell(f"methods/{world}/{method}", make, ev, data)
            c = res["cells"][f"methods/{world}/{method}"]
            if "pflops" not in c:  # micro-step FLOPs (fake tensors) x steps; the frozen tokenizer not counted
                prof = profile_step(make(0), method, device="fake")
                c["pflops"] = prof["flops_step"] * args.steps / 1e15
                c["images"] = n
                save()
    if {"dp", "k"} & set(args.parts):
        world = "new_colours"
        data = toy_data(work / "data", world)
        ev = ToyClassEvaluator(data / "test", extractor)
        n = sum(1 for _ in (data / "train").rglob("*.png"))
        eps_list = EPSILONS if "dp" in args.parts else ()
        for eps in eps_list:
            cell(f"dp/{world}/lora/eps{eps}", lambda s, eps=eps: toy_dp_config(toy_class_config(
                data, work / "dp" / f"eps{eps}_s{s}", "lora", steps=args.steps, seed=s), eps, n, noise_seed=s),
                ev, data)
        if "k" in args.parts:
            for k in (1, 8):
                cell(f"k/{world}/lora/eps10/k{k}", lambda s, k=k: toy_dp_config(toy_class_config(
                    data, work / "k" / f"k{k}_s{s}", "lora", steps=args.steps_k or args.steps, seed=s), 10, n,
                    aug_multiplicity=k, noise_seed=s), ev, data)
    save()
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    cells, lines = res["cells"], []
    for c in res["config"].get("parts", [res["config"]]):
        lines.append(f"`{c['command']}`: seeds {c['seeds']}, {c['steps']} optimizer steps of batch "
                     f"{c['batch_size']}.")
    lines.append("\nToy-extractor FID / precision / recall, mean ± std over training seeds.\n")
    worlds = sorted({k.split("/")[1] for k in cells if k.startswith("methods/")})
    for world in worlds:
        b = cells.get(f"base/{world}")
        lines.append(f"**{world}** (shipped tiny VAR before fine-tuning: FID {_fmt(b and b['fid'])}, "
                     f"precision {_fmt(b and b['precision'], '.3f')}, recall {_fmt(b and b['recall'], '.3f')})\n")
        lines.append("| method | FID | precision | recall | trainable params | training PFLOPs | train s |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for m in METHODS:
            c = cells.get(f"methods/{world}/{m}")
            if c:
                lines.append(f"| {m} | {_fmt(c['fid'])} | {_fmt(c['precision'], '.3f')} | {_fmt(c['recall'], '.3f')} "
                             f"| {c['trainable_params']:,} | {c.get('pflops', float('nan')):.2e} | "
                             f"{_fmt(c['train_seconds'], '.0f')} |")
        lines.append("")
    dp = [(k, c) for k, c in cells.items() if k.startswith("dp/")]
    if dp:
        lines.append("| DP-LoRA (new_colours) | FID | precision | recall |")
        lines.append("| --- | --- | --- | --- |")
        for k, c in sorted(dp, key=lambda kc: int(kc[0].rsplit("eps", 1)[1])):
            lines.append(f"| epsilon {k.rsplit('eps', 1)[1]} | {_fmt(c['fid'])} | {_fmt(c['precision'], '.3f')} "
                         f"| {_fmt(c['recall'], '.3f')} |")
        lines.append("")
    k1, k8 = cells.get("k/new_colours/lora/eps10/k1"), cells.get("k/new_colours/lora/eps10/k8")
    if k1 and k8:
        ratio = k8["train_seconds"]["mean"] / k1["train_seconds"]["mean"]
        lines.append("| DP-LoRA, epsilon 10 | FID | train s |")
        lines.append("| --- | --- | --- |")
        for name, c in (("k = 1", k1), ("k = 8", k8)):
            lines.append(f"| {name} | {_fmt(c['fid'])} | {_fmt(c['train_seconds'], '.0f')} |")
        lines.append(f"\nk = 8 / k = 1 training time: {ratio:.1f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""How reliably the shipped toy base draws the class a prompt names (docs/toy.md, issue 13).

For each plain class prompt ("a circle", ..., "a cross") and two background prompts, `--samples` images
(seeds 1000, 1001, ...) from the toy base, read by the toy attribute probe; per guidance/temperature
setting, the share whose shape is the asked one (and for the background prompts also the background).
Prints a Markdown table and writes JSON.

    python benchmarks/toy_base_classes.py                       # cfg 4 5 6 at tau 0.5, and cfg 4 at tau 1
    python benchmarks/toy_base_classes.py --settings 6:0.5 --samples 16 --toy-dir /tmp/toy
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arbooth.toy.models import TOY_DIR, ToyEvaluator, load_toy_base

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "cross")
EXTRA = ("a star on a red background", "a star on a black background")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["4:0.5", "5:0.5", "6:0.5", "4:1.0"],
                    help="cfg:tau pairs to sample with")
    ap.add_argument("--samples", type=int, default=64, help="images per prompt and setting")
    ap.add_argument("--toy-dir", default=str(TOY_DIR))
    ap.add_argument("--out", default="benchmarks/results/toy_base_classes.json")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base, ev = load_toy_base(a.toy_dir), ToyEvaluator(a.toy_dir)
    prompts = [f"a {s}" for s in SHAPES] + list(EXTRA)
    tok = base.tokenizer(prompts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        text = base.encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    mask = tok.attention_mask.bool()
    text, n, t0 = text * mask[..., None], a.samples, time.perf_counter()
    rows = []
    for setting in a.settings:
        cfg, tau = (float(v) for v in setting.split(":"))
        row = {"cfg": cfg, "tau": tau}
        for i, prompt in enumerate(prompts):
            images = base.model.generate(text[i:i + 1].expand(n, -1, -1), mask[i:i + 1].expand(n, -1), base.schedule,
                                         cfg=cfg, tau=tau, top_k=0, top_p=0.0, seed=[1000 + k for k in range(n)]).images
            preds = ev.attributes(images)
            want = prompt.split()[1]
            row[prompt] = sum(p["shape"] == want for p in preds) / n
            if "background" in prompt:
                row[prompt + " (background)"] = sum(p["background"] == prompt.split()[-2] for p in preds) / n
        row["mean over class prompts"] = sum(row[f"a {s}"] for s in SHAPES) / len(SHAPES)
        rows.append(row)
    cols = [f"a {s}" for s in SHAPES] + ["mean over class prompts", *EXTRA]
    print("| cfg | tau | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 2))
    for r in rows:
        print(f"| {r['cfg']:g} | {r['tau']:g} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"toy_dir": str(a.toy_dir), "samples": n, "seconds": time.perf_counter() - t0,
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

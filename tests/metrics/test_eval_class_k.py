"""Issue 28 mutant survivor: `eval-class --k` not passed to precision/recall (every test used the default)."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from arbooth.cli import main as cli


def _write_pngs(folder, n, seed, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_eval_class_k_reaches_precision_and_recall(tmp_path):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    _write_pngs(ref / "class0", 12, seed=0)
    _write_pngs(gen / "class0", 12, seed=1)
    got = {}
    for k in (1, 3, 8):
        out = tmp_path / f"k{k}"
        assert cli(["eval-class", "--generated", str(gen), "--reference", str(ref), "--random-weights",
                    "--device", "cpu", "--batch-size", "4", "--k", str(k), "--out", str(out), "--no-cache"]) == 0
        report = json.loads(next(out.rglob("eval_class.json")).read_text())
        assert report["k"] == k
        got[k] = (report["metrics"]["precision"], report["metrics"]["recall"])
    # larger k: larger k-NN balls, so precision and recall grow; the default k (3) alone would not show it
    assert got[1] <= got[3] <= got[8] and got[1] != got[3] and got[3] != got[8], got

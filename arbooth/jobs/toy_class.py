"""The class-conditional main job on the built-in world: what `arbooth train-class` runs with no arguments.

1. Writes the downstream toy dataset (default `new_colours`: three classes bound to colour schemes the
   shipped tiny VAR never saw, e.g. a blue circle on orange; it learned random colours) as an image
   folder `<out>/data/<world>/{train,test}/<class>/*.png`, once.
2. Measures the shipped tiny VAR on it (FID / precision / recall with the toy extractor, as many
   samples per class as the test split has, against the test split).
3. Fine-tunes it with the ordinary class recipe (arbooth/recipes/train_class.py; LoRA by default) from
   that folder, exactly as a CUB or Flowers run, and measures again.
4. Writes `<out>/metrics.json` and `<out>/grid.png` (one row per class: base samples left, fine-tuned
   samples right, same seeds).

`toy_class_config` is the config used here, by the tests and by benchmarks/toy_class_table.py.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from arbooth.adapt.methods import METHODS
from arbooth.config import from_dict, parse_overrides
from arbooth.errors import ConfigError
from arbooth.outputs import write_text
from arbooth.recipes.class_config import ClassTrainConfig
from arbooth.toy import class_var as cv
from arbooth.toy.class_eval import ToyClassEvaluator, sample
from arbooth.toy.class_world import world_by_name, write_class_dataset

log = logging.getLogger(__name__)

DEFAULT_OUT = "runs/toy_class"
DEFAULT_WORLD = "new_colours"
TRAIN_PER_CLASS, TEST_PER_CLASS = 64, 64
# Learning rates: LoRA's checked on the toy (new_colours, 40 steps, seed 0: FID 168 -> 24), the others
# scaled as in the paper (FFT 5x lower than LoRA); the other fields follow the paper's
# recipe: AdamW (0.9, 0.95), weight decay 0.05, constant lr, class dropout 0.1, LoRA alpha = 2 x rank.
LR = {"fft": 1e-3, "lora": 5e-3, "lora_attn": 5e-3, "lora_mlp": 5e-3, "lntuning": 5e-3}
LORA_RANK = 4  # width 96: rank 4 keeps LoRA near the paper's share of the parameters (rank 16 at width 1024)


def toy_data(root: str | Path, world: str = DEFAULT_WORLD, seed: int = 0) -> Path:
    """The downstream dataset `world` under root/<world> (written on first use)."""
    return write_class_dataset(Path(root) / world, world_by_name(world), train_per_class=TRAIN_PER_CLASS,
                               test_per_class=TEST_PER_CLASS, seed=seed)


def toy_class_config(data_root: str | Path, out_dir: str | Path, method: str = "lora", *, steps: int = 40,
                     seed: int = 0, batch_size: int = 16, overrides: Sequence[str] = (),
                     **sections: dict[str, Any]) -> ClassTrainConfig:
    """Fine-tuning config of the shipped tiny VAR on an image folder with train/ and test/ splits;
    `sections` update whole config sections, `overrides` are CLI-style key=value strings (applied last;
    a method chosen there brings its own toy learning rate unless optim.lr is given too)."""
    over = parse_overrides(overrides)
    method = over.get("method", {}).get("name", method)
    if method not in LR:  # the method section's own check, before the table is read (a KeyError before)
        raise ConfigError(f"method.name {method!r} is not one of {', '.join(METHODS)}")
    cfg = {
        "model": cv.model_fields(),
        "data": {"root": str(data_root), "split": "train", "image_size": 16, "num_workers": 0},
        "method": {"name": method, "lora_rank": LORA_RANK, "lora_alpha": 2 * LORA_RANK},
        "optim": {"lr": LR[method], "grad_clip": 1.0},
        "train": {"max_steps": steps, "batch_size": batch_size, "precision": "fp32", "seed": seed,
                  "out_dir": str(out_dir)},
        "log": {"every": 10},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return from_dict(ClassTrainConfig, cfg)


def base_var(cfg: ClassTrainConfig):
    from arbooth.adapt.finetuned import build_vae_var
    return build_vae_var(cfg.model)[1].eval()


def finetuned_var(run):
    from arbooth.adapt.methods import unwrap_peft
    return unwrap_peft(run.accelerator.unwrap_model(run.model)).eval()


def grid(base, tuned, num_classes: int, path: Path, class_names: list[str], per_side: int = 6,
         seed: int = 1234) -> Path:
    """One row per class: `per_side` base samples, a blank, `per_side` fine-tuned samples (same seeds)."""
    from arbooth.data.images import save_grid

    labels = torch.arange(num_classes).repeat_interleave(per_side)
    a = sample(base, labels, seed=seed).float() / 255
    b = sample(tuned, labels, seed=seed).float() / 255
    rows = []
    for c in range(num_classes):
        sl = slice(c * per_side, (c + 1) * per_side)
        rows += [a[sl], torch.ones(1, *a.shape[1:]), b[sl]]
    imgs = torch.nn.functional.interpolate(torch.cat(rows), scale_factor=3, mode="nearest")  # 48 px cells
    return save_grid(imgs, path, nrow=2 * per_side + 1, row_labels=class_names,
                     title=f"left: shipped tiny VAR   right: fine-tuned   ({per_side} samples each, same seeds)")


def run_default(out: str | Path = DEFAULT_OUT, world: str = DEFAULT_WORLD, overrides: Sequence[str] = ()) -> dict:
    """The whole main job; returns what it writes to <out>/metrics.json."""
    from arbooth.recipes.train_class import train

    t0 = time.perf_counter()
    out = Path(out)
    data = toy_data(out / "data", world)
    cfg = toy_class_config(data, out / "run", overrides=overrides)
    evaluator = ToyClassEvaluator(data / "test", cv.load_toy_extractor())
    base = base_var(cfg)
    before = evaluator.evaluate(base)
    log.info("before fine-tuning: %s", before)
    t_train = time.perf_counter()
    run = train(cfg)
    train_s = time.perf_counter() - t_train
    tuned = finetuned_var(run)
    after = evaluator.evaluate(tuned)
    log.info("after fine-tuning: %s", after)
    from arbooth.adapt.methods import count_parameters
    params = count_parameters(run.accelerator.unwrap_model(run.model))
    grid_path = grid(base, tuned, run.dataset.num_classes, out / "grid.png", run.dataset.classes)
    metrics = {
        "method": cfg.method.name, "world": world, "classes": run.dataset.classes,
        "fid_before": before["fid"], "fid_after": after["fid"],
        "precision_before": before["precision"], "recall_before": before["recall"],
        "precision": after["precision"], "recall": after["recall"],
        "trainable_params": params.trainable, "total_params": params.total,
        "steps": run.total_steps, "batch_size": cfg.train.batch_size, "lr": cfg.optim.lr, "seed": cfg.train.seed,
        "train_images": len(run.dataset), "test_images": len(evaluator.labels),
        "extractor": "toy (arbooth/assets/toy_class/extractor.safetensors; a toy stand-in for Inception)",
        "base": cv.base_id(), "grid": str(grid_path), "result": str(Path(cfg.train.out_dir) / "final"),
        "train_seconds": round(train_s, 1), "total_seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
    }
    write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    return metrics


def toy_dp_config(cfg: ClassTrainConfig, epsilon: float, num_images: int, *, aug_multiplicity: int = 1,
                  max_grad_norm: float = 1.0, noise_seed: int | None = 0):
    """The same run under DP-SGD at `epsilon` (delta 1/N): Poisson sampling at rate batch/N so the expected
    logical batch equals the non-private batch, per-example clipping at `max_grad_norm`, the same steps."""
    from arbooth.config import to_dict
    from arbooth.recipes.class_dp_config import ClassDPConfig

    raw = to_dict(cfg)
    raw["optim"]["grad_clip"] = 0.0  # DP clips per example instead
    raw["privacy"] = {"epsilon": float(epsilon), "sample_rate": cfg.train.batch_size / num_images,
                      "max_grad_norm": max_grad_norm, "aug_multiplicity": aug_multiplicity,
                      "max_physical_batch_size": cfg.train.batch_size, "noise_seed": noise_seed}
    return from_dict(ClassDPConfig, raw)


def finetune(cfg, evaluator: ToyClassEvaluator, *, sampling_seed: int = 0) -> dict:
    """Train `cfg` (a ClassTrainConfig, or a ClassDPConfig with one epsilon) and evaluate the result:
    FID / precision / recall, trainable parameters, optimizer steps and training wall time."""
    from arbooth.adapt.methods import count_parameters, unwrap_peft
    from arbooth.recipes import train_class, train_class_dp

    t0 = time.perf_counter()
    if isinstance(cfg, train_class_dp.ClassDPConfig):
        run = train_class_dp.train(cfg)[0]
        model, steps = run.model, run.pt.steps_taken
        extra = {"epsilon_spent": run.pt.epsilon(), "noise_multiplier": run.pt.noise_multiplier}
    else:
        run = train_class.train(cfg)
        model, steps, extra = run.accelerator.unwrap_model(run.model), len(run.history), {}
    seconds = time.perf_counter() - t0
    var = unwrap_peft(model).eval()
    return {**evaluator.evaluate(var, seed=sampling_seed), "trainable_params": count_parameters(model).trainable,
            "steps": steps, "train_seconds": round(seconds, 2), **extra}

"""Tiny VAR fine-tuning setups shared by tests/adapt and tests/recipes (imported as a plain module)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from arbooth.config import from_dict
from arbooth.recipes.class_config import ClassTrainConfig

TINY_MODEL = {"depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 10, "patch_nums": [1, 2, 4],
              "vocab_size": 64, "z_channels": 8, "vae_ch": 32, "vae_ch_mult": [1, 2]}


def write_dataset(root: Path, classes: int = 2, per_class: int = 8, size: int = 12) -> Path:
    """PNGs under root/<class>/: each class a colour with a little per-image noise."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            base = np.array([220, 40, 40]) if c == 0 else np.array([40, 60, 220])
            arr = np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / f"class_{c}" / f"{i}.png")
    return root


def tiny_config(data_root: Path, out_dir: Path, method: str = "lora", **sections) -> ClassTrainConfig:
    cfg = {
        "model": dict(TINY_MODEL),
        "data": {"root": str(data_root), "image_size": 8, "num_workers": 0, "hflip": True},
        "method": {"name": method},
        "optim": {"lr": 3e-3, "grad_clip": 1.0, "scheduler": "constant", "warmup_steps": 0},
        "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 1, "precision": "fp32", "seed": 0,
                  "out_dir": str(out_dir)},
        "log": {"every": 1},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg[k], **v}
    return from_dict(ClassTrainConfig, cfg)


def global_batch_config(data_root: Path, out_dir: Path, method: str = "lora") -> ClassTrainConfig:
    """One epoch with a logical batch of 8 = 2 per process x processes x accumulation; no class
    dropout, so 1 and 2 processes see the same examples per optimizer step and compute the same update."""
    return tiny_config(data_root, out_dir, method, optim={"lr": 1e-2, "class_dropout": 0.0},
                       train={"max_steps": None, "epochs": 1, "batch_size": 2, "grad_accum": None,
                              "global_batch_size": 8},
                       data={"hflip": False})

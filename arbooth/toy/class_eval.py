"""Downstream quality of a class-conditional VAR on a toy dataset: FID, precision and recall.

The protocol is the paper's (as many samples per class as the class has test images, FID against the
test split) with the toy feature extractor in place of Inception, and the same metric code as
`arbooth eval-class` (arbooth.metrics.fid: Frechet distance of Gaussian fits, k-NN precision/recall).
Generated images are rounded to uint8 exactly as a PNG written by eval-class would be.

Shapes: N images, D feature width.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from arbooth.data.images import list_image_files, read_image
from arbooth.errors import ConfigError
from arbooth.metrics.fid import FrechetDistance, GaussianStats, precision_recall
from arbooth.models.var_presets import VAR_GUIDANCE

SAMPLING = {"cfg": VAR_GUIDANCE, "top_k": 0, "top_p": 0.0}  # tiny vocabulary (256): no truncation needed


def class_folders(split_root: str | Path) -> list[Path]:
    """Class subfolders of a split, sorted (= labels 0..C-1, as the training data path reads them)."""
    subs = sorted(d for d in Path(split_root).iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subs:
        raise ConfigError(f"{split_root} has no class subfolders")
    return subs


def read_split(split_root: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of root/<class>/* as uint8 (N, 3, H, W) with labels (N,)."""
    imgs, labels = [], []
    for label, d in enumerate(class_folders(split_root)):
        for f in list_image_files(d):
            imgs.append(torch.from_numpy(np.asarray(read_image(f), dtype=np.uint8).copy()).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(imgs), torch.tensor(labels)


@torch.no_grad()
def features(extractor: torch.nn.Module, img_N3HW_uint8: torch.Tensor, batch: int = 256) -> np.ndarray:
    return torch.cat([extractor(img_N3HW_uint8[i:i + batch])["pool"].float()
                      for i in range(0, len(img_N3HW_uint8), batch)]).numpy()


@torch.no_grad()
def sample(var, labels_N: torch.Tensor, *, seed: int = 0, batch: int = 128, **sampling) -> torch.Tensor:
    """Images for `labels_N` as uint8 (N, 3, H, W); batch b is sampled with seed + b."""
    kw = {**SAMPLING, **sampling}
    was_training = var.training
    var.eval()
    out = []
    for b, i in enumerate(range(0, len(labels_N), batch)):
        x = var.generate(labels_N[i:i + batch], seed=seed + b, **kw)
        out.append((x.clamp(0, 1) * 255 + 0.5).to(torch.uint8))
    var.train(was_training)
    return torch.cat(out)


def quality(real_ND: np.ndarray, fake_ND: np.ndarray, k: int = 3) -> dict[str, float]:
    fid = FrechetDistance(reference=GaussianStats.from_features(real_ND))
    fid.update(fake_ND, real=False)
    p, r = precision_recall(real_ND, fake_ND, k=k)
    return {"fid": float(fid.compute()), "precision": float(p), "recall": float(r)}


class ToyClassEvaluator:
    """Holds the test split's features; `evaluate(var, seed)` samples as many images per class as the
    test split has and returns FID / precision / recall against it."""

    def __init__(self, test_root: str | Path, extractor: torch.nn.Module) -> None:
        self.extractor = extractor
        self.real_img, self.labels = read_split(test_root)
        self.real = features(extractor, self.real_img)

    def evaluate(self, var, seed: int = 0, **sampling) -> dict[str, float]:
        fake = sample(var, self.labels, seed=seed, **sampling)
        return quality(self.real, features(self.extractor, fake))

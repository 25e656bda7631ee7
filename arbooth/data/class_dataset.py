"""Class-labelled image datasets for class-conditional fine-tuning, with VAR's train augmentation.

Two ways to bring a dataset (Food-101, CUB-200-2011, Oxford Flowers, Stanford Cars, Oxford-IIIT Pet...):
- an image folder `root/<class_name>/*.jpg`, optionally split as `root/train/<class_name>/...`;
  classes are the sorted sub-folder names, labels their index;
- a manifest, CSV (header `path,label`) or JSONL (`{"path": ..., "label": ...}`); paths are relative to
  the manifest's folder; integer labels are used as they are, string labels are mapped to the index of
  their sorted name.

Augmentation follows FoundationVision/VAR utils/data.py: resize the short side to `mid_reso` x the final
size (Lanczos), random crop to the final size (VAR's train transform), optional horizontal flip, then
[-1, 1]. The crop and flip are drawn from a seed that comes with the index (see `EpochBatchSampler`),
so a resumed run sees exactly the same views and the worker count does not change the data.

Images are read only through `arbooth.data.images.read_image`. A file that cannot be read at training
time is replaced by the next readable sample with a warning naming it; the skipped paths ride along
in the batch so the trainer can report how many were skipped in total, never crashing mid-epoch.
"""
from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from arbooth.data.images import list_image_files, pil_to_tensor_m11, read_image
from arbooth.errors import ConfigError, ImageReadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def scan_image_folder(root: str | Path, split: str | None = "train") -> tuple[list[Sample], list[str]]:
    """Samples and class names of `root/<class>/*` (or `root/<split>/<class>/*` when that folder exists)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data folder not found: {root}")
    if split and (root / split).is_dir():
        root = root / split
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{root} has no class sub-folders (expected {root}/<class_name>/*.jpg)")
    samples = [Sample(p, i) for i, c in enumerate(classes) for p in list_image_files(root / c)]
    if not samples:
        raise ConfigError(f"no image files under {root}/<class_name>/")
    return samples, classes


def read_manifest(path: str | Path) -> tuple[list[Sample], list[str]]:
    """Samples of a CSV (`path,label` header) or JSONL manifest; class names are the label values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"manifest not found: {path}")
    rows: list[tuple[str, str | int]] = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                    rows.append((rec["path"], rec["label"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(f"{path}:{n}: expected {{\"path\": ..., \"label\": ...}} ({e})") from e
    else:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise ConfigError(f"{path}: CSV manifest needs a header with 'path' and 'label'")
            rows = [(r["path"], r["label"]) for r in reader]
    if not rows:
        raise ConfigError(f"manifest {path} lists no images")
    labels = [lab for _, lab in rows]
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in labels):
        ints = [int(v) for v in labels]
        if min(ints) < 0:
            raise ConfigError(f"{path}: labels must be >= 0")
        classes = [str(i) for i in range(max(ints) + 1)]
    else:
        classes = sorted({str(v) for v in labels})
        index = {c: i for i, c in enumerate(classes)}
        ints = [index[str(v)] for v in labels]
    return [Sample((path.parent / p).resolve(), lab) for (p, _), lab in zip(rows, ints)], classes


def var_augment(im: Image.Image, *, size: int, mid_size: int, random_crop: bool, hflip: bool,
                generator: torch.Generator | None) -> torch.Tensor:
    """VAR's train transform on one PIL image -> (3, size, size) in [-1, 1]."""
    w, h = im.size
    scale = mid_size / min(w, h)
    nw, nh = max(mid_size, round(w * scale)), max(mid_size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    if random_crop:
        x0 = int(torch.randint(0, nw - size + 1, (1,), generator=generator))
        y0 = int(torch.randint(0, nh - size + 1, (1,), generator=generator))
    else:
        x0, y0 = (nw - size) // 2, (nh - size) // 2
    im = im.crop((x0, y0, x0 + size, y0 + size))
    if hflip and bool(torch.rand((), generator=generator) < 0.5):
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pil_to_tensor_m11(im)


class ClassImageDataset(Dataset):
    """Map-style dataset; `ds[(index, seed)]` -> (image (3,H,W) in [-1,1], label, skipped paths)."""

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], *, size: int, mid_size: int,
                 random_crop: bool = True, hflip: bool = False):
        if not samples:
            raise ConfigError("the dataset is empty")
        self.samples, self.classes = list(samples), list(classes)
        self.size, self.mid_size, self.random_crop, self.hflip = size, mid_size, random_crop, hflip

    @classmethod
    def from_config(cls, data, *, size: int, mid_size: int, max_classes: int | None = None) -> ClassImageDataset:
        """Build from a `DataConfig` (manifest wins over root when both are given). Raises ConfigError
        when no data is given or when it has more than `max_classes` classes (the model's class table)."""
        if data.manifest:
            samples, classes = read_manifest(data.manifest)
        elif data.root:
            samples, classes = scan_image_folder(data.root, data.split)
        else:
            raise ConfigError("no data given: pass --data <folder> or set data.root / data.manifest")
        if max_classes is not None and len(classes) > max_classes:
            raise ConfigError(f"the dataset has {len(classes)} classes but the model's class table has "
                              f"{max_classes}")
        return cls(samples, classes, size=size, mid_size=mid_size, random_crop=data.random_crop,
                   hflip=data.hflip)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        skipped: list[str] = []
        for k in range(len(self.samples)):  # on a bad file, fall through to the next sample
            s = self.samples[(index + k) % len(self.samples)]
            try:
                im = read_image(s.path)
            except ImageReadError as e:
                log.warning("skipping %s", e)
                skipped.append(str(s.path))
                continue
            g = torch.Generator().manual_seed(seed)
            img = var_augment(im, size=self.size, mid_size=self.mid_size, random_crop=self.random_crop,
                              hflip=self.hflip, generator=g)
            return img, s.label, tuple(skipped)
        raise ImageReadError(f"no readable image among the {len(self.samples)} files of the dataset")


def collate_class_batch(items: list[tuple[torch.Tensor, int, tuple[str, ...]]]
                        ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """-> (img_B3HW, label_B, skipped paths of this batch)."""
    imgs, labels, skipped = zip(*items)
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.long), [p for s in skipped for p in s]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches for one process of a data-parallel run, resumable at any batch.

    Epoch `e` uses a permutation seeded by (seed, e); each global batch of `batch_size * world_size`
    indices is split so that rank r takes slice r. Every index comes with an augmentation seed derived
    from (seed, epoch, position), so the views do not depend on workers or on resuming. The last
    incomplete global batch of an epoch is dropped (VAR's trainer samples full batches only).
    """

    def __init__(self, num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 seed: int = 0):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ConfigError(f"the dataset has {num_samples} images, fewer than one global batch "
                              f"({batch_size} x {world_size} processes); lower train.batch_size")
        self.n, self.bs, self.world, self.rank, self.seed = num_samples, batch_size, world_size, rank, seed
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        """Make the next iteration run epoch `epoch` from its `batch`-th batch."""
        self.epoch, self.start_batch = epoch, batch

    def __len__(self) -> int:
        return self.n // (self.bs * self.world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        gb = self.bs * self.world
        for b in range(self.start_batch, len(self)):
            lo = b * gb + self.rank * self.bs
            yield [(perm[i], (self.seed * 1_000_003 + self.epoch) * 2_147_483 + i) for i in range(lo, lo + self.bs)]
        self.start_batch = 0

"""Class-labelled image datasets for class-conditional fine-tuning, with VAR's train augmentation.

Two ways to bring a dataset (Food-101, CUB-200-2011, Oxford Flowers, Stanford Cars, Oxford-IIIT Pet...):
- an image folder `root/<class_name>/...`, optionally split as `root/train/<class_name>/...`;
  classes are the sorted sub-folder names, labels their index; a class's images are ALL image files
  under its folder, recursively (`class_2/sub/x.png` belongs to class_2; hidden files and folders are
  ignored). Every command that reads class folders (train-class, DP, eval-class, audit, profile) uses
  this one rule through `scan_image_folder`; a class folder without images is an error naming it;
- a manifest, CSV (header `path,label`) or JSONL (`{"path": ..., "label": ...}`); paths are relative to
  the manifest's folder; integer labels are used as they are, string labels are mapped to the index of
  their sorted name.

Augmentation follows FoundationVision/VAR utils/data.py: resize the short side to `mid_reso` x the final
size (Lanczos), random crop to the final size (VAR's train transform), optional horizontal flip, then
[-1, 1]. The crop and flip are drawn from a seed that comes with the index (see `EpochBatchSampler`),
so a resumed run sees exactly the same views and the worker count does not change the data.

Images are read only through `arbooth.data.images.read_image`. `ClassImageDataset.from_config` reads
and validates every file before training (`drop_unreadable`): unreadable files are dropped, named in a
warning and counted (`dataset.unreadable`), so they never count in N (DP: delta = 1/N) and no other
image ever stands in for them (a substitute would enter a batch twice: sensitivity 2C under DP, a
silent bias otherwise). A file that becomes unreadable after that check is an error.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
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
    files = {c: list_image_files(root / c, recursive=True) for c in classes}
    empty = [c for c in classes if not files[c]]
    if empty:
        raise ConfigError(f"class folder(s) without any image file under {root}: {', '.join(empty[:8])}"
                          + (f" (+{len(empty) - 8} more)" if len(empty) > 8 else "")
                          + "; remove them or add images")
    return [Sample(p, i) for i, c in enumerate(classes) for p in files[c]], classes


def _read_error(path: Path) -> str | None:
    try:
        read_image(path)
    except ImageReadError as e:
        return str(e)
    return None


def drop_unreadable(samples: Sequence[Sample], *, num_workers: int = 0
                    ) -> tuple[list[Sample], dict[str, str]]:
    """(readable samples, {path: reason} of the unreadable ones): every file is decoded once, in
    `num_workers` processes when > 0. Each unreadable file is named in a warning."""
    paths = [s.path for s in samples]
    if num_workers > 0:
        # its own generator: the worker seed must not come from (and shift) the global RNG
        loader = torch.utils.data.DataLoader(paths, batch_size=None, num_workers=num_workers,
                                             collate_fn=_read_error, generator=torch.Generator())
        errors = list(loader)
    else:
        errors = [_read_error(p) for p in paths]
    bad = {str(s.path): e for s, e in zip(samples, errors) if e is not None}
    for reason in bad.values():
        log.warning("unreadable, left out of the data set: %s", reason)
    if bad:
        log.warning("%d of %d image file(s) are unreadable and left out (N = %d)", len(bad), len(samples),
                    len(samples) - len(bad))
    return [s for s, e in zip(samples, errors) if e is None], bad


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
                 random_crop: bool = True, hflip: bool = False, unreadable: dict[str, str] | None = None):
        if not samples:
            raise ConfigError("the dataset is empty" + (f" ({len(unreadable)} unreadable file(s) left out)"
                                                        if unreadable else ""))
        self.samples, self.classes = list(samples), list(classes)
        self.size, self.mid_size, self.random_crop, self.hflip = size, mid_size, random_crop, hflip
        self.unreadable = dict(unreadable or {})  # path -> reason, of files left out

    @classmethod
    def from_config(cls, data, *, size: int, mid_size: int, max_classes: int | None = None) -> ClassImageDataset:
        """Build from a `DataConfig` (manifest wins over root when both are given); every file is read
        once first and the unreadable ones are left out (`unreadable`). Raises ConfigError when no data is
        given or when it has more than `max_classes` classes (the model's class table)."""
        if data.manifest:
            samples, classes = read_manifest(data.manifest)
        elif data.root:
            samples, classes = scan_image_folder(data.root, data.split)
        else:
            raise ConfigError("no data given: pass --data <folder> or set data.root / data.manifest")
        if max_classes is not None and len(classes) > max_classes:
            raise ConfigError(f"the dataset has {len(classes)} classes but the model's class table has "
                              f"{max_classes}")
        good, bad = drop_unreadable(samples, num_workers=data.num_workers)
        return cls(good, classes, size=size, mid_size=mid_size, random_crop=data.random_crop,
                   hflip=data.hflip, unreadable=bad)

    def fingerprint(self) -> str:
        """SHA-256 of the data's identity: class names, and each sample's path (relative to the samples'
        common folder, so a moved copy matches), label and size in bytes. Recorded by training states."""
        root = os.path.commonpath([str(s.path.parent) for s in self.samples])
        h = hashlib.sha256(json.dumps(self.classes).encode())
        for s in self.samples:
            h.update(f"{os.path.relpath(s.path, root)}|{s.label}|{s.path.stat().st_size}\n".encode())
        return h.hexdigest()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """-> (image (3, H, W) in [-1, 1], label). Raises ImageReadError for a file that became
        unreadable after `drop_unreadable` (never another image in its place)."""
        index, seed = key if isinstance(key, tuple) else (key, key)
        s = self.samples[index]
        im = read_image(s.path)
        g = torch.Generator().manual_seed(seed)
        return var_augment(im, size=self.size, mid_size=self.mid_size, random_crop=self.random_crop,
                           hflip=self.hflip, generator=g), s.label


def collate_class_batch(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (img_B3HW, label_B)."""
    imgs, labels = zip(*items)
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.long)


def augmentation_seed(seed: int, epoch: int, position: int, view: int | None = None) -> int:
    """The seed of the crop/flip of the example at `position` of epoch `epoch`'s order (a function of the
    run's seed only, so resumes and worker counts see the same views); with `view`, the seed of that
    example's view-th augmented copy (DP augmentation multiplicity, arbooth/recipes/train_class_dp.py)."""
    s = (seed * 1_000_003 + epoch) * 2_147_483 + position
    return s if view is None else s * 1_009 + view


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
            yield [(perm[i], augmentation_seed(self.seed, self.epoch, i)) for i in range(lo, lo + self.bs)]
        self.start_batch = 0

"""Class datasets: folder and manifest layouts, VAR augmentation, resumable sharded batches, bad files."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from arbooth.data.class_dataset import (
    ClassImageDataset,
    EpochBatchSampler,
    Sample,
    collate_class_batch,
    drop_unreadable,
    read_manifest,
    scan_image_folder,
    var_augment,
)
from arbooth.errors import ConfigError, ImageReadError


def _write(path: Path, color: tuple[int, int, int], size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_folder_layout_with_split(tmp_path):
    _write(tmp_path / "train" / "daisy" / "a.jpg", (255, 0, 0))
    _write(tmp_path / "train" / "rose" / "b.png", (0, 255, 0))
    _write(tmp_path / "train" / "rose" / "c.png", (0, 0, 255))
    (tmp_path / "train" / "rose" / "notes.txt").write_text("ignored")
    _write(tmp_path / "test" / "tulip" / "d.png", (0, 0, 0))
    samples, classes = scan_image_folder(tmp_path, "train")
    assert classes == ["daisy", "rose"]
    assert [(s.path.name, s.label) for s in samples] == [("a.jpg", 0), ("b.png", 1), ("c.png", 1)]
    samples, classes = scan_image_folder(tmp_path / "train", "train")  # no split folder: root itself
    assert classes == ["daisy", "rose"]


def test_manifests_csv_and_jsonl(tmp_path):
    _write(tmp_path / "img" / "a.png", (1, 2, 3))
    _write(tmp_path / "img" / "b.png", (4, 5, 6))
    (tmp_path / "m.csv").write_text("path,label\nimg/a.png,3\nimg/b.png,1\n")
    samples, classes = read_manifest(tmp_path / "m.csv")
    assert [s.label for s in samples] == [3, 1] and len(classes) == 4
    assert samples[0].path == (tmp_path / "img" / "a.png").resolve()
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in
                                                [{"path": "img/a.png", "label": "rose"},
                                                 {"path": "img/b.png", "label": "daisy"}]))
    samples, classes = read_manifest(tmp_path / "m.jsonl")
    assert classes == ["daisy", "rose"] and [s.label for s in samples] == [1, 0]
    (tmp_path / "bad.csv").write_text("file,cls\nx,1\n")
    with pytest.raises(ConfigError, match="header"):
        read_manifest(tmp_path / "bad.csv")


def test_var_augment_resizes_short_side_and_crops():
    # a 60x20 image: short side -> 18 (1.125 * 16), long side -> 54, crop 16x16
    im = Image.new("RGB", (60, 20), (255, 255, 255))
    x = var_augment(im, size=16, mid_size=18, random_crop=True, hflip=True,
                    generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.ones_like(x))
    # the crop position comes from the generator: same seed, same crop; the image has a gradient
    grad = Image.fromarray((torch.arange(60).repeat(20, 1) * 4).to(torch.uint8).numpy()).convert("RGB")
    a = [var_augment(grad, size=16, mid_size=18, random_crop=True, hflip=False,
                     generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2, 3, 4)]
    assert torch.equal(a[0], a[1])
    assert any(not torch.equal(a[0], b) for b in a[2:])
    c = var_augment(grad, size=16, mid_size=18, random_crop=False, hflip=False, generator=None)
    assert c.min() >= -1 and c.max() <= 1


def test_sampler_shards_ranks_and_resumes():
    full = EpochBatchSampler(10, 2, world_size=2, rank=0, seed=3)
    other = EpochBatchSampler(10, 2, world_size=2, rank=1, seed=3)
    assert len(full) == 2  # 10 // 4; the last incomplete global batch is dropped
    b0, b1 = list(full), list(other)
    idx0 = {i for b in b0 for i, _ in b}
    idx1 = {i for b in b1 for i, _ in b}
    assert not idx0 & idx1 and len(idx0) == len(idx1) == 4
    resumed = EpochBatchSampler(10, 2, world_size=2, rank=0, seed=3)
    resumed.set_position(0, 1)
    assert list(resumed) == b0[1:]
    full.set_position(1)
    assert list(full) != b0  # a new epoch reshuffles (and re-seeds the augmentation)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        EpochBatchSampler(3, 2, world_size=2)


def test_bad_inputs_are_left_out_before_training_never_substituted(tmp_path, bad_inputs_dir, caplog):
    # The shared folder of awkward files becomes one class of an image-folder dataset.
    (tmp_path / "cls").symlink_to(bad_inputs_dir, target_is_directory=True)
    samples, classes = scan_image_folder(tmp_path)
    names = {s.path.name for s in samples}
    assert "notes.txt" not in names and not any(n.startswith(".") for n in names)
    expected_bad = {"truncated.jpg", "zero_bytes.png", "not_an_image.jpg", "bomb_40000x40000.png"}
    with caplog.at_level(logging.WARNING):
        good, bad = drop_unreadable(samples)
    assert {Path(p).name for p in bad} == expected_bad
    assert {s.path.name for s in good} == names - expected_bad
    for name in expected_bad:  # every bad file is named in a warning; the bomb with its reason
        assert any(name in r.getMessage() for r in caplog.records), name
    assert any("decompression-bomb" in r.getMessage() for r in caplog.records)
    assert drop_unreadable(samples, num_workers=1) == (good, bad)  # the same with a worker process
    ds = ClassImageDataset(good, classes, size=16, mid_size=18, hflip=True, unreadable=bad)
    imgs, labels = collate_class_batch([ds[(i, i)] for i in range(len(ds))])
    assert imgs.shape == (len(good), 3, 16, 16) and labels.shape == (len(good),)
    assert imgs.min() >= -1 and imgs.max() <= 1
    # a file that breaks after the check is an error naming it, not another image in its place
    broken = ClassImageDataset([Sample(bad_inputs_dir / "truncated.jpg", 0)], ["x"], size=16, mid_size=18)
    with pytest.raises(ImageReadError, match="truncated.jpg"):
        broken[0]


def test_tiny_and_extreme_aspect_images_follow_the_resize_policy(bad_inputs_dir):
    for name in ("tiny_8x8.png", "extreme_aspect.jpg", "exif_rotated.jpg", "cmyk.jpg",
                 "sixteen_bit_gray.png", "rgba_with_alpha.png", "animated.gif"):
        ds = ClassImageDataset([Sample(bad_inputs_dir / name, 0)], ["x"], size=16, mid_size=18)
        img, _ = ds[0]
        assert img.shape == (3, 16, 16), name


def test_augmentation_seed_is_the_one_formula_of_both_class_recipes():
    from arbooth.data.class_dataset import EpochBatchSampler, augmentation_seed
    from arbooth.recipes.train_class_dp import MultiViewDataset

    sampler = EpochBatchSampler(8, batch_size=4, seed=3)
    sampler.set_position(2)
    batch = next(iter(sampler))
    assert [s for _, s in batch] == [augmentation_seed(3, 2, i) for i in range(4)]
    assert augmentation_seed(3, 2, 1) == (3 * 1_000_003 + 2) * 2_147_483 + 1   # the seeds runs were made with
    assert augmentation_seed(3, 2, 1, view=4) == augmentation_seed(3, 2, 1) * 1_009 + 4

    class Seeds:  # stands in for a ClassImageDataset: returns the seed it was asked to augment with
        def __getitem__(self, key):
            return torch.tensor(float(key[1] % 9973)), 0

        def __len__(self):
            return 8
    views = MultiViewDataset(Seeds(), views=2, seed=3)
    views.epoch = 2
    imgs, _ = views[1]
    assert imgs.tolist() == [float(augmentation_seed(3, 2, 1, v) % 9973) for v in range(2)]

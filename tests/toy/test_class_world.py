"""The class toy world: deterministic items, disjoint splits on disk, read by the ordinary data path."""
from __future__ import annotations

import json

import numpy as np
import pytest

from arbooth.cli import main as cli_main
from arbooth.data.class_dataset import scan_image_folder
from arbooth.errors import ConfigError
from arbooth.toy.class_world import (
    DOWNSTREAM,
    SOURCE,
    ClassSpec,
    ClassWorld,
    world_by_name,
    write_class_dataset,
)


def test_items_are_pure_functions_of_their_index_and_differ_between_indices():
    a, b = np.asarray(SOURCE.image(2, 7, seed=3)), np.asarray(SOURCE.image(2, 7, seed=3))
    assert a.shape == (16, 16, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(SOURCE.image(2, 8, seed=3)))
    assert not np.array_equal(a, np.asarray(SOURCE.image(2, 7, seed=4)))


def test_downstream_classes_are_new_to_the_source():
    def look(c):
        return c.shape, c.texture, c.colour, c.background

    assert {c.texture for c in SOURCE.classes} == {"plain"}
    assert {(c.colour, c.background) for c in SOURCE.classes} == {(None, None)}  # random colours
    for world in DOWNSTREAM.values():
        assert len(world.classes) >= 2
        assert not {look(c) for c in world.classes} & {look(c) for c in SOURCE.classes}
    img = np.asarray(DOWNSTREAM["new_colours"].image(0, 5))  # blue circle on orange
    assert tuple(img[0, 0]) == (245, 130, 30)
    assert not {c.shape for c in DOWNSTREAM["new_shapes"].classes} & {c.shape for c in SOURCE.classes}


def test_dataset_folder_has_disjoint_splits_and_loads_as_an_image_folder(tmp_path):
    root = write_class_dataset(tmp_path / "ns", DOWNSTREAM["new_shapes"], train_per_class=3, test_per_class=2)
    train, classes = scan_image_folder(root, "train")
    test, _ = scan_image_folder(root, "test")
    assert classes == ["arrow", "cross", "heart"] and len(train) == 9 and len(test) == 6
    assert not {s.path.name for s in train} & {s.path.name for s in test}
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["world"] == "new_shapes" and meta["classes"] == classes
    stamp = (root / "train" / "arrow" / "00000.png").stat().st_mtime_ns
    write_class_dataset(root, DOWNSTREAM["new_shapes"], train_per_class=3, test_per_class=2)  # no rewrite
    assert (root / "train" / "arrow" / "00000.png").stat().st_mtime_ns == stamp


def test_toy_data_command_and_errors(tmp_path, capsys):
    assert cli_main(["toy-data", "--out", str(tmp_path), "--train-per-class", "2", "--test-per-class", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DOWNSTREAM)
    assert "new_textures: 3 classes" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unknown toy class world"):
        world_by_name("imagenet")
    with pytest.raises(ConfigError, match="sorted"):
        ClassWorld("bad", (ClassSpec("b", "circle"), ClassSpec("a", "square")))
    with pytest.raises(ConfigError, match="shape"):
        ClassSpec("x", "hexagon")

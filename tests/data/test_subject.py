"""Subject folders: real photos, awkward files, metadata, and clear errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from arbooth.data.subject import load_subject, read_subject_info
from arbooth.errors import ArboothError, ConfigError


def test_toy_subject(toy_subject_dir: Path) -> None:
    subj = load_subject(toy_subject_dir, 64, class_noun="dog")
    assert len(subj) == 5 and subj.images_N3HW.shape == (5, 3, 64, 64)
    assert subj.images_N3HW.min() >= -1 and subj.images_N3HW.max() <= 1
    assert subj.images_N3HW.std() > 0.1  # content, not a constant
    assert subj.info.class_noun == "dog" and not subj.skipped


def test_real_vico_subject(vico_dir: Path) -> None:
    """Optional (--vico / ARBOOTH_VICO): real photos of a ViCo subject read the same way."""
    subj = load_subject(vico_dir / "brown_dog", 64, class_noun="dog")
    assert len(subj) == 5 and subj.images_N3HW.shape == (5, 3, 64, 64) and subj.images_N3HW.std() > 0.1


def test_bad_inputs_folder_follows_its_readme(bad_inputs_dir: Path) -> None:
    subj = load_subject(bad_inputs_dir, 32)
    names = {p.name for p in subj.paths}
    skipped = {p.name for p in subj.skipped}
    for ok in ("ok_rgb.jpg", "ok_rgb.webp", "grayscale.png", "palette.png", "rgba_with_alpha.png",
               "cmyk.jpg", "sixteen_bit_gray.png", "exif_rotated.jpg", "extreme_aspect.jpg",
               "tiny_8x8.png", "animated.gif"):
        assert ok in names, ok
    for bad in ("truncated.jpg", "zero_bytes.png", "not_an_image.jpg", "bomb_40000x40000.png"):
        assert bad in skipped and bad in subj.skipped[next(p for p in subj.skipped if p.name == bad)]
    assert ".hidden_dotfile.jpg" not in names | skipped and "notes.txt" not in names | skipped
    assert subj.images_N3HW.shape == (len(names), 3, 32, 32)
    assert "decompression-bomb" in next(v for p, v in subj.skipped.items() if p.name.startswith("bomb"))


def test_exif_rotation_is_honoured(bad_inputs_dir: Path, tmp_path: Path) -> None:
    shutil.copy(bad_inputs_dir / "exif_rotated.jpg", tmp_path / "a.jpg")
    raw = Image.open(tmp_path / "a.jpg")
    w, h = raw.size
    assert raw.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # a 90-degree orientation tag
    from arbooth.data.images import read_image
    assert read_image(tmp_path / "a.jpg").size == (h, w)


def test_folder_without_readable_image_is_a_clear_error(bad_inputs_dir: Path, tmp_path: Path) -> None:
    for name in ("truncated.jpg", "zero_bytes.png", "not_an_image.jpg", "notes.txt"):
        shutil.copy(bad_inputs_dir / name, tmp_path / name)
    with pytest.raises(ArboothError, match=str(tmp_path)):
        load_subject(tmp_path, 32)
    with pytest.raises(ArboothError, match="not found"):
        load_subject(tmp_path / "missing", 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArboothError, match="no readable image"):
        load_subject(empty, 32)


def test_min_images(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "x.png")
    with pytest.raises(ArboothError, match="at least 3"):
        load_subject(tmp_path, 16, min_images=3)
    subj = load_subject(tmp_path, 16)
    assert torch.allclose(subj.images_N3HW[0, 0], torch.full((16, 16), 200 / 127.5 - 1), atol=1e-6)


def test_subject_yaml(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    (tmp_path / "subject.yaml").write_text("class_noun: teapot\nkind: object\nprompts: ['a {} on a table']\n")
    info = read_subject_info(tmp_path)
    assert info.class_noun == "teapot" and info.kind == "object" and info.prompts == ("a {} on a table",)
    assert load_subject(tmp_path, 8, class_noun="kettle").info.class_noun == "kettle"
    (tmp_path / "subject.yaml").write_text("class_nown: teapot\n")
    with pytest.raises(ConfigError, match="class_nown"):
        read_subject_info(tmp_path)
    (tmp_path / "subject.yaml").write_text("kind: animal\n")
    with pytest.raises(ConfigError, match="kind"):
        read_subject_info(tmp_path)
    (tmp_path / "subject.yaml").write_text("prompts: ['no placeholder']\n")
    with pytest.raises(ConfigError, match="placeholder|\\{\\}"):
        read_subject_info(tmp_path)


def test_prompt_templates_one_reader_for_eval_and_bench(tmp_path):
    """eval-subject and bench-subject read prompt lists through one function: templates need `{}`, an empty
    or missing list is one line (naming what the file is for)."""
    import pytest as _pytest

    from arbooth.data.subject import read_prompt_templates
    from arbooth.errors import ArboothError

    f = tmp_path / "p.txt"
    f.write_text("a {} in the jungle\n\n  a {} on the beach \n")
    assert read_prompt_templates(f) == ("a {} in the jungle", "a {} on the beach")
    f.write_text("a dog\n")
    with _pytest.raises(ArboothError, match="without the"):
        read_prompt_templates(f)
    f.write_text("\n")
    with _pytest.raises(ArboothError, match="is empty"):
        read_prompt_templates(f)
    with _pytest.raises(ArboothError, match=r"not found \(for x\)"):
        read_prompt_templates(tmp_path / "none.txt", where=" (for x)")

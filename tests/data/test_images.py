"""Every image reader goes through arbooth.data.images; this checks it against the bad-inputs fixture."""
import numpy as np
import pytest
import torch
from _bad_inputs import READABLE, UNREADABLE
from PIL import Image

from arbooth.data.images import (
    center_crop_resize,
    pil_to_tensor_m11,
    read_image,
    read_image_folder,
    save_grid,
)
from arbooth.errors import ImageReadError


@pytest.mark.parametrize("name", READABLE)
def test_readable_become_rgb8(bad_inputs_dir, name):
    im = read_image(bad_inputs_dir / name)
    assert im.mode == "RGB"
    assert np.asarray(im).dtype == np.uint8


@pytest.mark.parametrize("name", UNREADABLE)
def test_unreadable_raise_naming_file(bad_inputs_dir, name):
    with pytest.raises(ImageReadError, match=name):
        read_image(bad_inputs_dir / name)


def test_bomb_refused(bad_inputs_dir):
    with pytest.raises(ImageReadError, match="decompression-bomb"):
        read_image(bad_inputs_dir / "bomb_40000x40000.png")


def test_exif_applied(bad_inputs_dir):
    raw = Image.open(bad_inputs_dir / "exif_rotated.jpg")
    assert read_image(bad_inputs_dir / "exif_rotated.jpg").size == raw.size[::-1]


def test_alpha_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(read_image(tmp_path / "clear.png"))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_scaled(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "w16.png")
    assert np.asarray(read_image(tmp_path / "w16.png")).min() == 255


def test_folder_skips_and_ignores(bad_inputs_dir, caplog):
    out = read_image_folder(bad_inputs_dir, min_size=16)
    names = sorted(p.name for p in out.paths)
    assert names == sorted(set(READABLE) - {"tiny_8x8.png"})
    assert sorted(p.name for p in out.skipped) == sorted(UNREADABLE + ["bomb_40000x40000.png", "tiny_8x8.png"])
    assert ".hidden_dotfile.jpg" not in names and "notes.txt" not in names
    assert "truncated.jpg" in caplog.text


def test_empty_folder_is_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match=f"no readable image in {tmp_path}"):
        read_image_folder(tmp_path)
    with pytest.raises(ImageReadError, match="not a folder"):
        read_image_folder(tmp_path / "missing")


def test_crop_tensor_grid(tmp_path, bad_inputs_dir):
    im = center_crop_resize(read_image(bad_inputs_dir / "extreme_aspect.jpg"), 32)
    assert im.size == (32, 32)
    x = pil_to_tensor_m11(im)
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    path = save_grid(torch.rand(5, 3, 8, 8), tmp_path / "g.png", nrow=3)
    assert Image.open(path).size == (3 * 10 + 2, 2 * 10 + 2)


def test_grid_labels_widen_the_canvas(tmp_path):
    plain = save_grid(torch.rand(4, 3, 8, 8), tmp_path / "plain.png", nrow=2)
    labelled = save_grid(torch.rand(4, 3, 8, 8), tmp_path / "lab.png", nrow=2, row_labels=["a star", "a <S*> star"],
                         title="base | personalized")
    (w0, h0), (w1, h1) = Image.open(plain).size, Image.open(labelled).size
    assert w1 > w0 and h1 > h0
    left = np.asarray(Image.open(labelled))[:, : w1 - w0]
    assert (left < 128).any()  # text was drawn in the margin

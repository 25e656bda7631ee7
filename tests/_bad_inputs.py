"""Awkward image files for every reader of user images, written by code (nothing committed), with the
behaviour a user expects from each (the table below is what the tests check).

| file | expected behaviour |
| --- | --- |
| ok_rgb.jpg, ok_rgb.webp | read normally |
| grayscale.png, palette.png, rgba_with_alpha.png, cmyk.jpg, sixteen_bit_gray.png | 8-bit RGB (alpha on white) |
| exif_rotated.jpg | read upright: EXIF orientation 6 applied (stored 320x240, read 240x320) |
| extreme_aspect.jpg (2000x120), tiny_8x8.png | resize/crop policy, or skipped with a reason (min_size) |
| animated.gif | first frame |
| truncated.jpg, zero_bytes.png, not_an_image.jpg | skipped with a warning naming the file |
| bomb_40000x40000.png | refused (decompression-bomb limit), never decoded |
| .hidden_dotfile.jpg, notes.txt | ignored |
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

READABLE = ["ok_rgb.jpg", "ok_rgb.webp", "grayscale.png", "palette.png", "rgba_with_alpha.png", "cmyk.jpg",
            "sixteen_bit_gray.png", "exif_rotated.jpg", "extreme_aspect.jpg", "tiny_8x8.png", "animated.gif"]
UNREADABLE = ["truncated.jpg", "zero_bytes.png", "not_an_image.jpg"]


def _photo(w: int = 320, h: int = 240, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: colour ramps, a bright disc, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    disc = ((xx - 0.4) ** 2 + (yy - 0.35) ** 2) < 0.03
    rgb = np.stack([xx, yy, 1 - xx], -1) * 200 + disc[..., None] * 55 + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit grey pixels (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def write_bad_inputs(folder: Path) -> Path:
    """Write every file of the table above into `folder` (created) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = _photo()
    photo.save(folder / "ok_rgb.jpg", quality=90)
    photo.save(folder / ".hidden_dotfile.jpg", quality=90)
    photo.save(folder / "ok_rgb.webp")
    photo.convert("L").save(folder / "grayscale.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "palette.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(folder / "rgba_with_alpha.png")
    photo.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    grey16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(grey16).save(folder / "sixteen_bit_gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    photo.save(folder / "exif_rotated.jpg", exif=exif, quality=90)
    _photo(2000, 120, seed=1).save(folder / "extreme_aspect.jpg", quality=90)
    _photo(8, 8, seed=2).save(folder / "tiny_8x8.png")
    frames = [_photo(64, 64, seed=s).convert("P", palette=Image.Palette.ADAPTIVE) for s in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (folder / "zero_bytes.png").write_bytes(b"")
    (folder / "not_an_image.jpg").write_text("this is a text file named like a JPEG\n" * 8)
    (folder / "bomb_40000x40000.png").write_bytes(bomb_png())
    (folder / "notes.txt").write_text("a stray text file in an image folder\n")
    return folder

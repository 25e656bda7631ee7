"""Reading user images safely: every code path that opens a user's image goes through here.

Policy (tested on `../shared/bad_inputs`):
- any mode becomes 8-bit RGB: alpha is composited on white, 16-bit is scaled to 8 bit, CMYK and
  palette are converted;
- EXIF orientation is applied, so a photo reads upright;
- animated files give their first frame;
- images over `MAX_PIXELS` are refused before decoding (decompression-bomb guard);
- corrupt, truncated, empty and non-image files raise `ImageReadError` naming the file, and folder
  readers skip them with a warning and count them;
- hidden files and files without an image extension are ignored;
- images smaller than `min_size` on their short side are skipped with a reason by folder readers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from arbooth.errors import ImageReadError
from arbooth.outputs import save_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# 64 MP: far above any photo used for training here, far below what would exhaust memory.
MAX_PIXELS = 64_000_000


def read_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open `path` as an upright 8-bit RGB PIL image, or raise ImageReadError with the reason."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageReadError(f"{path}: {w}x{h} pixels exceeds the limit of {max_pixels} "
                                     "(decompression-bomb guard); resize it first")
            im.seek(0)  # animated: first frame
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb8(im)
            rgb.load()
            return rgb
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: refused, over the decompression-bomb limit ({e})") from e
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def _to_rgb8(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


def list_image_files(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """Image files in `folder`, sorted; hidden files and other extensions are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"not a folder: {folder}")
    it = folder.rglob("*") if recursive else folder.iterdir()
    # hidden files, and (recursively) anything inside a hidden folder such as .ipynb_checkpoints/
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


@dataclass
class FolderImages:
    """Result of reading a folder: the good images and, for each skipped file, the reason."""

    paths: list[Path] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    skipped: dict[Path, str] = field(default_factory=dict)


def read_image_folder(folder: str | Path, *, min_size: int = 1, recursive: bool = False,
                      max_pixels: int = MAX_PIXELS, require_any: bool = True) -> FolderImages:
    """Read every image of a folder, skipping bad files with a warning; error if none is readable."""
    out = FolderImages()
    for p in list_image_files(folder, recursive=recursive):
        try:
            im = read_image(p, max_pixels=max_pixels)
        except ImageReadError as e:
            out.skipped[p] = str(e)
            log.warning("skipping %s", e)
            continue
        if min(im.size) < min_size:
            out.skipped[p] = f"{p}: {im.size[0]}x{im.size[1]} is smaller than {min_size}px on its short side"
            log.warning("skipping %s", out.skipped[p])
            continue
        out.paths.append(p)
        out.images.append(im)
    if out.skipped:
        log.warning("%s: read %d image(s), skipped %d", folder, len(out.images), len(out.skipped))
    if require_any and not out.images:
        raise ImageReadError(f"no readable image in {folder}"
                             + (f" ({len(out.skipped)} skipped)" if out.skipped else ""))
    return out


def center_crop_resize(im: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to `size` (Lanczos): the subject-photo policy."""
    return ImageOps.fit(im, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def pil_to_tensor_m11(im: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float().div(127.5).sub(1.0)


def tensor_to_pil(x_3HW: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image."""
    arr = (x_3HW.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def save_grid(images_B3HW: torch.Tensor, path: str | Path, *, nrow: int, pad: int = 2,
              row_labels: list[str] | None = None, title: str | None = None) -> Path:
    """Save a batch of [0, 1] images as one PNG grid with `nrow` images per row; optional text labels
    left of each row and a title line above (PIL's built-in font, so no font file is needed)."""
    b, _, h, w = images_B3HW.shape
    ncol = nrow
    nrows = (b + ncol - 1) // ncol
    grid = torch.ones(3, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(b):
        r, cidx = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + cidx * (w + pad)
        grid[:, y:y + h, x:x + w] = images_B3HW[i].detach().float().cpu().clamp(0, 1)
    image = tensor_to_pil(grid)
    if row_labels or title:
        from PIL import ImageDraw, ImageFont

        font = ImageFont.load_default()
        line_h = 12
        left = int(max((font.getlength(t) for t in row_labels or []), default=0)) + (10 if row_labels else 0)
        top = line_h + 6 if title else 0
        canvas = Image.new("RGB", (image.width + left, image.height + top), (255, 255, 255))
        canvas.paste(image, (left, top))
        draw = ImageDraw.Draw(canvas)
        if title:
            draw.text((left + pad, 3), title, fill=(0, 0, 0), font=font)
        for r, text in enumerate((row_labels or [])[:nrows]):
            draw.text((4, top + pad + r * (h + pad) + max(0, (h - line_h) // 2)), text, fill=(0, 0, 0), font=font)
        image = canvas
    return save_image(image, path)

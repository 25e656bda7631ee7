"""Writing evaluation reports: one JSON file and one Markdown table, printed and saved together."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from arbooth.data.images import list_image_files, read_image
from arbooth.errors import ImageReadError
from arbooth.outputs import write_text

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_NOTE = ("RANDOM WEIGHTS: the extractors were randomly initialised (--random-weights); "
                       "these numbers are meaningless and only show that the pipeline runs.")


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def write_report(out_dir: Path, stem: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_text(jpath, json.dumps(data, indent=2, default=str) + "\n")
    write_text(mpath, markdown + "\n")
    return jpath, mpath


def publish_report(out_dir: Path, stem: str, data: dict[str, Any], title: str, body: str, *,
                   random_weights: bool, n_skipped: int) -> tuple[Path, Path]:
    """The eval commands' ending: the Markdown report (title, the random-weights banner, body, a line on
    skipped files) printed and written with the JSON next to it."""
    md = f"# {title}\n\n"
    if random_weights:
        md += f"**{RANDOM_WEIGHTS_NOTE}**\n\n"
    md += body
    if n_skipped:
        md += f"\n\nSkipped {n_skipped} unreadable file(s): see the JSON report."
    print(md)
    jpath, mpath = write_report(out_dir, stem, data, md)
    print(f"\nsaved {jpath} and {mpath}")
    return jpath, mpath


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def iter_images(folder: Path, skipped: dict[str, str], *, recursive: bool = True):
    """Yield (path, RGB image) for every readable image under `folder`, one at a time (large folders
    never sit in memory); unreadable files go to `skipped` with their reason, as read_image_folder does."""
    for p in list_image_files(folder, recursive=recursive):
        try:
            im: Image.Image = read_image(p)
        except ImageReadError as e:
            skipped[str(p)] = str(e)
            log.warning("skipping %s", e)
            continue
        yield p, im

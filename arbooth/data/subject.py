"""A subject folder for ARBooth personalization: 3-6 photos of one subject plus optional metadata.

Layout::

    subjects/my_dog/
        01.jpg 02.png ...      any common format and size (read by arbooth.data.images: EXIF orientation
                               applied, bad files skipped with a warning naming them)
        subject.yaml           optional: class_noun, kind (live | object), prompts (list with `{}`)

Images are centre-cropped to a square and resized to the training resolution (the authors resize
the short side and centre-crop, booth_train_final.py L147-154: same result for square outputs).
Tensors are (N, 3, H, W) float32 in [-1, 1].
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from arbooth.config import load_config
from arbooth.data.images import center_crop_resize, pil_to_tensor_m11, read_image_folder
from arbooth.errors import ArboothError, ConfigError, ImageReadError

log = logging.getLogger(__name__)

SUBJECT_YAML = "subject.yaml"


@dataclass(frozen=True)
class SubjectInfo:
    """Contents of `subject.yaml`; every field optional in the file."""

    class_noun: str | None = None  # "dog", "teapot": the class word of the instance/class prompts
    kind: Literal["live", "object"] | None = None  # picks the ViCo/DreamBench prompt list when prompts are absent
    prompts: tuple[str, ...] = ()  # evaluation/validation prompts; `{}` stands for the subject phrase

    def __post_init__(self) -> None:
        if self.class_noun is not None and not self.class_noun.strip():
            raise ValueError("class_noun must not be empty")
        for p in self.prompts:
            if "{}" not in p:
                raise ValueError(f"prompt {p!r} has no '{{}}' where the subject phrase goes")


@dataclass
class SubjectData:
    """The images of a subject, ready for training, and where they came from."""

    folder: Path
    info: SubjectInfo
    images_N3HW: torch.Tensor
    paths: list[Path]
    skipped: dict[Path, str]

    def __len__(self) -> int:
        return len(self.paths)


def read_subject_info(folder: str | Path) -> SubjectInfo:
    """`subject.yaml` as a typed SubjectInfo (all defaults when the file is absent)."""
    path = Path(folder) / SUBJECT_YAML
    if not path.is_file():
        return SubjectInfo()
    return load_config(SubjectInfo, path)


def load_subject(folder: str | Path, resolution: int, *, min_images: int = 1,
                 class_noun: str | None = None) -> SubjectData:
    """Read a subject folder: every readable image, centre-cropped and resized to `resolution`.

    `class_noun` (e.g. from the command line) overrides the one in subject.yaml. Raises
    ArboothError when the folder is missing, holds no readable image, or fewer than `min_images`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArboothError(f"subject folder not found: {folder}")
    if resolution < 1:
        raise ConfigError(f"resolution must be positive, got {resolution}")
    info = read_subject_info(folder)
    if class_noun is not None:
        info = dataclasses.replace(info, class_noun=class_noun)
    try:
        found = read_image_folder(folder)
    except ImageReadError as e:
        raise ArboothError(f"subject folder {folder}: {e}. Put 3-6 photos of the subject "
                           "(jpg/png/webp/...) in it.") from e
    if len(found.images) < min_images:
        raise ArboothError(f"subject folder {folder}: {len(found.images)} readable image(s), "
                           f"at least {min_images} needed")
    tensors = [pil_to_tensor_m11(center_crop_resize(im, resolution)) for im in found.images]
    log.info("subject %s: %d image(s) at %dx%d%s", folder, len(tensors), resolution, resolution,
             f", {len(found.skipped)} skipped" if found.skipped else "")
    return SubjectData(folder=folder, info=info, images_N3HW=torch.stack(tensors),
                       paths=found.paths, skipped=found.skipped)


def read_prompt_templates(path: str | Path, *, where: str = "") -> tuple[str, ...]:
    """The prompt templates of a ViCo/DreamBench list: one per non-empty line, each with one `{}` where the
    subject phrase goes ("a {} in the jungle"). `where`: what the file is for, added to the not-found line.
    Raises ArboothError (one line) for a missing or empty file or a line without `{}`."""
    path = Path(path)
    if not path.is_file():
        raise ArboothError(f"prompt list {path} not found{where}")
    templates = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not templates:
        raise ArboothError(f"prompt list {path} is empty")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ArboothError(f"{path}: prompt(s) without the `{{}}` subject placeholder: {bad[:3]}")
    return templates

"""The built-in toy benchmark of `arbooth bench-subject`: a ViCo-layout folder of toy subjects the shipped
toy base never saw, and the toy oracle that scores their samples.

Subjects: split stars (a star with its top half in a second colour) of four colour pairs. Split stars are
held out of the toy base's pretraining (arbooth/toy/world.py ToyWorld `exclude`), so no subject's look is
known to the base, while its VAE represents the two-tone layout. Two are marked `kind: live` and use the
"live" prompt list: nothing in the toy world is alive, the mark is nominal and exercises the ViCo table's
live / object split and its second prompt list. Prompts only ask for what the toy world can show (a
background colour, a size); prompt backgrounds (red, white, black, orange) never match a subject's colours.

The folder, as ViCo's (../shared/vico): `<subject>/*.png` + `subject.yaml` (class_noun, kind) +
`attributes.json` (the oracle's ground truth), `prompts_live_objects.txt`, `prompts_nonlive_objects.txt`.

Oracle (the attribute probe, arbooth/toy/report.py): per prompt `subject_acc` (share of images showing the
subject: its shape, colour and top-half colour), `background_acc` / `size_acc` (the asked background /
size), `I_ID` (toy identity-embedding similarity to the photos, the DINO stand-in), `T_CLIP` (toy CLIP
text similarity); on the class prompt's samples `class_shape_acc` and `class_subject_leak`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from arbooth.toy.models import IMAGE_SIZE, TOY_DIR, ToyEvaluator
from arbooth.toy.report import asked_attributes, is_subject
from arbooth.toy.world import ToyAttributes, subject_views

# name -> (attributes, nominal live-ness)
TOY_SUBJECTS: dict[str, tuple[ToyAttributes, bool]] = {
    "star_green_yellow": (ToyAttributes("star", "green", "split", "yellow"), True),
    "star_purple_yellow": (ToyAttributes("star", "purple", "split", "yellow"), True),
    "star_blue_green": (ToyAttributes("star", "blue", "split", "green"), False),
    "star_yellow_purple": (ToyAttributes("star", "yellow", "split", "purple"), False),
}
LIVE_PROMPTS = ("a {} on a red background", "a small {}", "a {} on a white background")
OBJECT_PROMPTS = ("a {} on a black background", "a small {} on a orange background", "a {} on a white background")
PHOTO_BACKGROUNDS = ("red", "white", "black", "orange", "red")
CLASS_PROMPT = "a {}"   # toy captions have no "a photo of" (configs/subject/toy.yaml class_template)
# What the toy benchmark trains with: configs/subject/toy.yaml plus these (a teacher bank: 3x faster steps)
OVERRIDES = ("steps=150", "teacher.bank_size=16")
VARIANTS = (("full", ()), ("lora", ("tuning.method=lora",)))
IMAGES_PER_PROMPT = 4
PRES_SAMPLES = 16


def write_toy_benchmark(folder: str | Path, n_photos: int = 5) -> Path:
    """Write the toy benchmark into `folder` (a no-op for files already there with the same content)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "prompts_live_objects.txt", "\n".join(LIVE_PROMPTS) + "\n")
    _write(folder / "prompts_nonlive_objects.txt", "\n".join(OBJECT_PROMPTS) + "\n")
    for name, (attrs, live) in TOY_SUBJECTS.items():
        d = folder / name
        d.mkdir(exist_ok=True)
        for k, item in enumerate(subject_views(attrs, n_photos, backgrounds=PHOTO_BACKGROUNDS)):
            if not (d / f"{k:02d}.png").is_file():
                item.image.save(d / f"{k:02d}.png")
        _write(d / "subject.yaml", yaml.safe_dump({"class_noun": attrs.shape, "kind": "live" if live else "object"},
                                                  sort_keys=False))
        _write(d / "attributes.json", json.dumps(attrs.to_dict(), indent=1) + "\n")
    return folder


def _write(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


class ToyOracle:
    """The toy evaluators bound to one subject's attributes. Images are (N, 3, H, W) in [0, 1] at the toy
    resolution (32x32)."""

    def __init__(self, toy_dir: str | Path = TOY_DIR) -> None:
        self.ev = ToyEvaluator(toy_dir)

    @staticmethod
    def applies_to(size: tuple[int, int]) -> bool:
        """Whether images of `size` (W, H) are the toy base's: the probe and toy CLIP read 32x32 images only
        (another base on the toy subjects, e.g. `model.preset=tiny`, gets no oracle columns)."""
        return tuple(size) == (IMAGE_SIZE, IMAGE_SIZE)

    def prompt_metrics(self, images_N3HW: torch.Tensor, prompt: str, attrs: dict, subject_N3HW: torch.Tensor) -> dict:
        """Oracle rates and toy similarities of one prompt's images (`prompt`: the text with the class noun)."""
        preds = self.ev.attributes(images_N3HW)
        sub_id = self.ev.identity(subject_N3HW)
        n = len(preds)
        row = {"subject_acc": sum(is_subject(p, attrs) for p in preds) / n,
               "I_ID": (self.ev.identity(images_N3HW) @ sub_id.T).mean().item(),
               "toy_T_CLIP": (self.ev.clip_image(images_N3HW) @ self.ev.clip_text([prompt]).T).mean().item()}
        for key, want in asked_attributes(prompt).items():
            row[f"{key}_acc"] = sum(p[key] == want for p in preds) / n
        return row

    def class_metrics(self, images_N3HW: torch.Tensor, attrs: dict, subject_N3HW: torch.Tensor) -> dict:
        """On the class prompt's samples: the share showing the class, the share showing the subject's look
        (leak), and the toy PRES (I_ID to the photos; lower = prior kept)."""
        preds = self.ev.attributes(images_N3HW)
        n = len(preds)
        return {"class_shape_acc": sum(p["shape"] == attrs["shape"] for p in preds) / n,
                "class_subject_leak": sum(is_subject(p, attrs, shape=False) for p in preds) / n,
                "toy_PRES": (self.ev.identity(images_N3HW) @ self.ev.identity(subject_N3HW).T).mean().item()}

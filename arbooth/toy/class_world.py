"""The class-conditional toy world: labelled images of simple objects, and its source/downstream splits.

An image shows one object of a class's shape (and, for some classes, texture) in a random colour, size,
place and rotation, on a plain background of another random colour. Item `(label, index)` of a world
is a pure function of (world name, seed, label, index), so a dataset can be regenerated bit for bit.

- `SOURCE` is what the tiny class-conditional VAR is pretrained on: five plain shapes.
- `DOWNSTREAM` holds what it never saw: `new_shapes` (three shapes absent from the source),
  `new_textures` (source shapes, but striped / dotted / checkered, a texture the source never had) and
  `new_colours` (source shapes bound to one fixed colour scheme each, e.g. a blue circle on orange:
  the source's colours are random, so these class appearances are new).
  `write_class_dataset` writes one as an ordinary image folder, `root/{train,test}/<class>/*.png`,
  so fine-tuning reads it through the same data path as CUB or Flowers.

Rendering is our own (PIL polygons at 4x, box-filtered down), separate from the text-to-image toy world
(arbooth/toy/world.py) so that each world can change without moving the other's shipped models.
"""
from __future__ import annotations

import json
import math
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from arbooth.errors import ConfigError
from arbooth.outputs import write_text

IMAGE_SIZE = 16
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "heart", "arrow")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
           "purple": (140, 50, 180), "orange": (245, 130, 30), "white": (245, 245, 245), "black": (25, 25, 25)}
TEXTURES = ("plain", "striped", "dotted", "checkered")
_SS = 4  # supersampling factor


@dataclass(frozen=True)
class ClassSpec:
    name: str
    shape: str
    texture: str = "plain"
    colour: str | None = None       # None: a random colour per image
    background: str | None = None   # None: a random background colour per image

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.texture not in TEXTURES:
            raise ConfigError(f"toy class {self.name!r}: shape must be one of {SHAPES}, texture one of {TEXTURES}")
        if any(c is not None and c not in COLOURS for c in (self.colour, self.background)):
            raise ConfigError(f"toy class {self.name!r}: colours must be among {sorted(COLOURS)}")


@dataclass(frozen=True)
class ClassWorld:
    """A named list of classes; label = position in `classes` (sorted by name, as image folders are)."""

    name: str
    classes: tuple[ClassSpec, ...]

    def __post_init__(self) -> None:
        names = [c.name for c in self.classes]
        if names != sorted(names) or len(set(names)) != len(names):
            raise ConfigError(f"toy world {self.name}: class names must be unique and sorted, got {names}")

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def image(self, label: int, index: int, seed: int = 0, size: int = IMAGE_SIZE) -> Image.Image:
        """Item `index` of class `label`: RGB, size x size."""
        spec = self.classes[label]
        rng = random.Random(zlib.crc32(f"{self.name}|{seed}|{label}|{index}".encode()))
        colour, background, second = rng.sample(sorted(COLOURS), 3)
        colour, background = spec.colour or colour, spec.background or background
        if second in (colour, background):
            second = next(c for c in sorted(COLOURS) if c not in (colour, background))
        big = rng.random() < 0.5
        r = 0.36 if big else 0.26
        margin = r + 0.04
        return render(spec.shape, colour, background, texture=spec.texture, texture_colour=second, radius=r,
                      cx=rng.uniform(margin, 1 - margin), cy=rng.uniform(margin, 1 - margin),
                      angle=rng.uniform(-20, 20), size=size)


SOURCE = ClassWorld("source", tuple(ClassSpec(s, s) for s in sorted(("circle", "square", "triangle", "diamond",
                                                                      "star"))))
DOWNSTREAM = {
    "new_shapes": ClassWorld("new_shapes", (ClassSpec("arrow", "arrow"), ClassSpec("cross", "cross"),
                                            ClassSpec("heart", "heart"))),
    "new_textures": ClassWorld("new_textures", (ClassSpec("checkered_triangle", "triangle", "checkered"),
                                                ClassSpec("dotted_square", "square", "dotted"),
                                                ClassSpec("striped_circle", "circle", "striped"))),
    "new_colours": ClassWorld("new_colours", (ClassSpec("blue_circle_on_orange", "circle", colour="blue",
                                                        background="orange"),
                                              ClassSpec("purple_square_on_yellow", "square", colour="purple",
                                                        background="yellow"),
                                              ClassSpec("white_diamond_on_green", "diamond", colour="white",
                                                        background="green"))),
}


# ----------------------------------------------------------------------------- rendering

def _outline(shape: str) -> list[tuple[float, float]]:
    """Outline of `shape` in unit coordinates (radius about 1 around the origin, y down)."""
    if shape == "circle":
        return [(math.cos(t * math.pi / 24), math.sin(t * math.pi / 24)) for t in range(48)]
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
    if shape == "star":
        return [((1.0 if k % 2 == 0 else 0.45) * math.sin(k * math.pi / 5),
                 -(1.0 if k % 2 == 0 else 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a, b = 0.32, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a)]
    if shape == "heart":
        ts = [2 * math.pi * k / 48 for k in range(48)]
        return [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                                - math.cos(4 * t)) / 17 + 0.1) for t in ts]
    if shape == "arrow":  # pointing right
        return [(-0.95, -0.3), (0.1, -0.3), (0.1, -0.8), (0.95, 0.0), (0.1, 0.8), (0.1, 0.3), (-0.95, 0.3)]
    raise ConfigError(f"unknown toy shape {shape!r}")


def render(shape: str, colour: str, background: str, *, texture: str = "plain", texture_colour: str = "white",
           radius: float = 0.36, cx: float = 0.5, cy: float = 0.5, angle: float = 0.0,
           size: int = IMAGE_SIZE) -> Image.Image:
    """One object on a plain background; radius and centre are fractions of the image side."""
    S = size * _SS
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    pts = [(cx * S + radius * S * (x * ca - y * sa), cy * S + radius * S * (x * sa + y * ca))
           for x, y in _outline(shape)]
    mask = Image.new("L", (S, S), 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    fill = Image.new("RGB", (S, S), COLOURS[colour])
    if texture != "plain":  # pattern anchored at the object's centre, so it moves with the object
        draw, tc, period = ImageDraw.Draw(fill), COLOURS[texture_colour], S / 5.0
        x0, y0 = cx * S, cy * S
        for i in range(-6, 7):
            for j in range(-6, 7):
                x, y = x0 + i * period, y0 + j * period
                if texture == "striped" and j == 0:  # vertical bars, half a period wide
                    draw.rectangle([x, 0, x + period / 2, S], fill=tc)
                elif texture == "dotted":
                    rad = period * 0.25
                    draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=tc)
                elif texture == "checkered" and (i + j) % 2 == 0:
                    draw.rectangle([x, y, x + period, y + period], fill=tc)
    img = Image.new("RGB", (S, S), COLOURS[background])
    img.paste(fill, (0, 0), mask)
    return img.resize((size, size), Image.BOX)


def random_item(index: int, seed: int = 0, size: int = IMAGE_SIZE, *, shapes: tuple[str, ...] = SHAPES,
                textures: tuple[str, ...] = TEXTURES) -> tuple[Image.Image, dict[str, int]]:
    """An unlabelled draw over `shapes` x `textures` with its attributes as indices into SHAPES, TEXTURES
    and COLOURS (for the tokenizer and the feature extractor, which learn generic toy images)."""
    rng = random.Random(zlib.crc32(f"random|{seed}|{index}".encode()))
    shape, texture = rng.choice(shapes), rng.choice(textures)
    colour, background, second = rng.sample(sorted(COLOURS), 3)
    r = 0.36 if rng.random() < 0.5 else 0.26
    margin = r + 0.04
    img = render(shape, colour, background, texture=texture, texture_colour=second, radius=r,
                 cx=rng.uniform(margin, 1 - margin), cy=rng.uniform(margin, 1 - margin), angle=rng.uniform(-20, 20),
                 size=size)
    names = list(COLOURS)
    return img, {"shape": SHAPES.index(shape), "texture": TEXTURES.index(texture), "colour": names.index(colour),
                 "background": names.index(background)}


# ----------------------------------------------------------------------------- datasets on disk

def write_class_dataset(root: str | Path, world: ClassWorld, *, train_per_class: int = 64,
                        test_per_class: int = 64, seed: int = 0, size: int = IMAGE_SIZE) -> Path:
    """Write `root/train/<class>/NNNNN.png` and `root/test/<class>/NNNNN.png` plus `dataset.json`.

    Train items are indices [0, train_per_class), test items the next test_per_class, so the splits are
    disjoint draws of the same world. Returns `root`. Rewrites nothing when `dataset.json` already
    describes the same dataset."""
    root = Path(root)
    meta = {"format": "arbooth-toy-class/1", "world": world.name, "classes": world.class_names, "seed": seed,
            "size": size, "train_per_class": train_per_class, "test_per_class": test_per_class}
    meta_path = root / "dataset.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return root
    for split, lo, n in (("train", 0, train_per_class), ("test", train_per_class, test_per_class)):
        for label, name in enumerate(world.class_names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(lo, lo + n):
                world.image(label, i, seed, size).save(folder / f"{i:05d}.png")
    write_text(meta_path, json.dumps(meta, indent=1) + "\n")  # written last: its presence means the folder is complete
    return root


def world_by_name(name: str) -> ClassWorld:
    worlds = {"source": SOURCE, **DOWNSTREAM}
    if name not in worlds:
        raise ConfigError(f"unknown toy class world {name!r}; choose one of {', '.join(worlds)}")
    return worlds[name]

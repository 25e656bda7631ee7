"""The toy world: a deterministic, seeded, unlimited stream of small images of simple objects with captions.

Every image shows one object (circle, square, triangle, star, heart, diamond, cross) of one colour,
optionally textured (stripes or dots in a second colour), big or small, somewhere on a plain background
of another colour. Item `i` of `ToyWorld(seed)` is always the same image, so training data needs no
files and an evaluation can regenerate exactly what a model saw. The known attributes of every item
come with it, for oracle checks.

Captions name a random subset of the attributes, e.g. "a small red star on a blue background",
"a dotted heart", "a circle": attributes left out vary freely, so a prompt naming only the class
("a star") draws from every star the world holds. Rendering: PIL polygons at 4x the size, box-filtered
down (anti-aliased edges), about 0.2 ms per 32x32 image.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from arbooth.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
           "purple": (140, 50, 180), "orange": (245, 130, 30), "white": (245, 245, 245), "black": (25, 25, 25)}
TEXTURES = ("plain", "striped", "dotted")
SIZES = ("small", "big")
_SS = 4  # supersampling factor


@dataclass(frozen=True)
class ToyAttributes:
    shape: str
    colour: str
    texture: str = "plain"
    texture_colour: str = "white"   # colour of the stripes/dots (unused for plain)
    size: str = "big"
    background: str = "blue"
    cx: float = 0.5                 # centre, as a fraction of the image side
    cy: float = 0.5
    angle: float = 0.0              # rotation in degrees

    def __post_init__(self) -> None:
        for name, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                     ("texture", self.texture, TEXTURES), ("size", self.size, SIZES),
                                     ("background", self.background, COLOURS),
                                     ("texture_colour", self.texture_colour, COLOURS)):
            if value not in allowed:
                raise ConfigError(f"toy {name} {value!r} is not one of {sorted(allowed)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ToyItem:
    image: Image.Image      # RGB, size x size
    caption: str
    attrs: ToyAttributes


# ----------------------------------------------------------------------------- rendering


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Outline points of `shape` (radius r around (cx, cy)); circles are 48-gons."""
    if shape == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(0.0, -1.0), (0.9, 0.7), (-0.9, 0.7)]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.sin(k * math.pi / 5),
                -(1.0 if k % 2 == 0 else 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                                - math.cos(4 * t)) / 17 + 0.1) for t in ts]
    elif shape == "cross":
        a, b = 0.3, 0.9
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
               (-a, -a)]
    else:
        raise ConfigError(f"unknown toy shape {shape!r}")
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def render(attrs: ToyAttributes, size: int = 32) -> Image.Image:
    """Draw `attrs` as an RGB image of `size` x `size` pixels."""
    S = size * _SS
    r = S * (0.36 if attrs.size == "big" else 0.22)
    outline = _polygon(attrs.shape, attrs.cx * S, attrs.cy * S, r, attrs.angle)
    mask = Image.new("L", (S, S), 0)
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    fill = Image.new("RGB", (S, S), COLOURS[attrs.colour])
    if attrs.texture != "plain":  # pattern in object coordinates, so it moves with the object
        draw, tc, period = ImageDraw.Draw(fill), COLOURS[attrs.texture_colour], S / 6.5
        if attrs.texture == "striped":
            for k in range(-10, 10):  # slanted stripes, half a period wide
                x0 = attrs.cx * S + k * period
                draw.polygon([(x0, 0), (x0 + period / 2, 0), (x0 + period / 2 + S / 2, S), (x0 + S / 2, S)], fill=tc)
        else:
            rad = period * 0.28
            for i in range(-7, 8):
                for j in range(-7, 8):
                    x, y = attrs.cx * S + i * period, attrs.cy * S + j * period
                    draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=tc)
    img = Image.new("RGB", (S, S), COLOURS[attrs.background])
    img.paste(fill, (0, 0), mask)
    return img.resize((size, size), Image.BOX)


def caption(attrs: ToyAttributes, parts: Sequence[str] = ("size", "colour", "texture", "background")) -> str:
    """"a [size] [colour] [striped|dotted] <shape> [on a <bg> background]" with the named attributes."""
    words = ["a"]
    if "size" in parts:
        words.append(attrs.size)
    if "colour" in parts:
        words.append(attrs.colour)
    if "texture" in parts and attrs.texture != "plain":
        words.append(attrs.texture)
    words.append(attrs.shape)
    if "background" in parts:
        words += ["on", "a", attrs.background, "background"]
    return " ".join(words)


# ----------------------------------------------------------------------------- the world


class ToyWorld:
    """Item i of the stream is a pure function of (seed, i). `exclude` lists (shape, texture) pairs
    that never occur (the demo subject's appearance is held out this way); `p_caption` is the chance
    that each optional attribute is named in the caption; `p_texture` the chance of a textured object."""

    def __init__(self, seed: int = 0, size: int = 32, *, exclude: Sequence[tuple[str, str]] = (("star", "dotted"),),
                 p_caption: float = 0.6, p_texture: float = 0.3):
        if size < 8:
            raise ConfigError(f"toy images must be at least 8 pixels, got {size}")
        self.seed, self.size, self.exclude = seed, size, {tuple(e) for e in exclude}
        self.p_caption, self.p_texture = p_caption, p_texture

    def attributes(self, i: int) -> tuple[ToyAttributes, tuple[str, ...]]:
        rng = random.Random(self.seed * 1_000_003 + i)
        while True:
            shape = rng.choice(SHAPES)
            texture = rng.choice(TEXTURES[1:]) if rng.random() < self.p_texture else "plain"
            if (shape, texture) not in self.exclude:
                break
        colour, background, tcol = rng.sample(sorted(COLOURS), 3)
        size = rng.choice(SIZES)
        margin = 0.38 if size == "big" else 0.26
        attrs = ToyAttributes(shape, colour, texture, tcol, size, background,
                              cx=rng.uniform(margin, 1 - margin), cy=rng.uniform(margin, 1 - margin),
                              angle=rng.uniform(-15, 15))
        parts = tuple(p for p in ("size", "colour", "texture", "background") if rng.random() < self.p_caption)
        return attrs, parts

    def __getitem__(self, i: int) -> ToyItem:
        attrs, parts = self.attributes(i)
        return ToyItem(render(attrs, self.size), caption(attrs, parts), attrs)

    def batch(self, start: int, n: int) -> list[ToyItem]:
        return [self[start + k] for k in range(n)]

    def __iter__(self) -> Iterator[ToyItem]:
        i = 0
        while True:
            yield self[i]
            i += 1


def vocabulary() -> list[str]:
    """Every word a toy caption or toy prompt may use (the toy tokenizer's vocabulary)."""
    extra = ["a", "an", "the", "of", "photo", "on", "in", "with", "and", "background"]
    return list(dict.fromkeys([*extra, *SIZES, *COLOURS, *TEXTURES[1:], *SHAPES]))


def images_to_array(items: Sequence[ToyItem]) -> np.ndarray:
    """(N, H, W, 3) uint8."""
    return np.stack([np.asarray(it.image) for it in items])


# ----------------------------------------------------------------------------- demo subject

DEMO_SUBJECT = ToyAttributes("star", "green", "dotted", "yellow", "big", "blue")  # held out of pretraining
DEMO_PROMPTS = ("a {} on a red background", "a {} on a white background", "a small {}",
                "a {} on a black background", "a small {} on a orange background")
_DEMO_BACKGROUNDS = ("blue", "purple", "white", "red", "black")


def subject_views(attrs: ToyAttributes, n: int = 5, seed: int = 0, backgrounds: Sequence[str] = _DEMO_BACKGROUNDS,
                  size: int = 32) -> list[ToyItem]:
    """`n` images of one object (`attrs`' shape, colours, texture, size) in varied backgrounds, places, angles."""
    rng = random.Random(seed)
    margin = 0.38 if attrs.size == "big" else 0.26
    items = []
    for k in range(n):
        a = ToyAttributes(attrs.shape, attrs.colour, attrs.texture, attrs.texture_colour, attrs.size,
                          backgrounds[k % len(backgrounds)], cx=rng.uniform(margin, 1 - margin),
                          cy=rng.uniform(margin, 1 - margin), angle=rng.uniform(-15, 15))
        items.append(ToyItem(render(a, size), caption(a), a))
    return items


def write_subject(folder, attrs: ToyAttributes = DEMO_SUBJECT, prompts: Sequence[str] = DEMO_PROMPTS,
                  n: int = 5, seed: int = 0, size: int = 32):
    """Write a subject folder: n PNGs, subject.yaml (class noun, prompts) and attributes.json (for oracle checks)."""
    import json
    from pathlib import Path

    import yaml
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, it in enumerate(subject_views(attrs, n, seed, size=size)):
        it.image.save(folder / f"{k:02d}.png")
    (folder / "subject.yaml").write_text(yaml.safe_dump(
        {"class_noun": attrs.shape, "kind": "object", "prompts": list(prompts)}, sort_keys=False))
    (folder / "attributes.json").write_text(json.dumps(attrs.to_dict(), indent=1) + "\n")
    return folder

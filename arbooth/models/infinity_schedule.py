"""Infinity's dynamic-resolution scale schedules (official infinity/utils/dynamic_resolution.py).

Every aspect ratio h/w has one template: 13 (h, w) token-map sizes at a VAE stride of 16. The first
7, 10, 12 or 13 of them form the '0.06M', '0.25M', '0.60M' and '1M' pixel schedules. Ratios below 1
are the transposes of those above 1 (their keys are `int(1 / r * 1000) / 1000`, as released).
"""
from __future__ import annotations

from arbooth.errors import ConfigError

VAE_STRIDE = 16
_RATIO_TO_HWS = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)],
}
TEMPLATES: dict[float, list[tuple[int, int]]] = {}
for _r, _hws in _RATIO_TO_HWS.items():
    TEMPLATES[_r] = _hws
    if _r != 1.0:
        TEMPLATES[int(1 / _r * 1000) / 1000] = [(w, h) for h, w in _hws]
PIXELS = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}  # number of scales per pixel budget

Schedule = list[tuple[int, int, int]]


def nearest_template(h_div_w: float) -> float:
    """The template aspect ratio closest to `h_div_w` (official: argmin |h_div_w - template|)."""
    if not h_div_w > 0:
        raise ConfigError(f"h_div_w must be positive, got {h_div_w}")
    return min(TEMPLATES, key=lambda r: abs(r - float(h_div_w)))


def infinity_scale_schedule(h_div_w: float = 1.0, pn: str = "1M") -> Schedule:
    """[(1, h, w), ...] for the template nearest to `h_div_w` at pixel budget `pn` (the t entry is 1
    for images, as in tools/run_infinity.py)."""
    if pn not in PIXELS:
        raise ConfigError(f"unknown pn {pn!r}; choose one of {sorted(PIXELS)}")
    return [(1, h, w) for h, w in TEMPLATES[nearest_template(h_div_w)][: PIXELS[pn]]]


def image_size(schedule: Schedule) -> tuple[int, int]:
    """(H, W) in pixels of the last scale of `schedule`."""
    _, h, w = schedule[-1]
    return h * VAE_STRIDE, w * VAE_STRIDE


def rope_grid_size(schedule: Schedule) -> tuple[int, int]:
    """Final 1M token map of the template that `schedule` belongs to: the official 2-D RoPE
    (`rope2d_normalized_by_hw=2`, basic.py precompute_rope2d_freqs_grid) spreads every scale over it."""
    _, h, w = schedule[-1]
    return TEMPLATES[nearest_template(h / w)][-1]

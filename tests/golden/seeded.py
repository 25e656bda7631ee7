"""Seeded weights, image probes and file I/O for the golden vectors in tests/golden.

Used by two sides that must agree exactly: `make_golden.py` (which loads these weights into the
OFFICIAL models and records their outputs) and the golden tests (which load the same weights into
ours). Nothing in the `arbooth` package imports this module.

The weights are not stored. `seeded_state_dict` rebuilds them from a seed and the checkpoint's key
layout alone: one `torch.Generator` stream, one standard-normal draw per key in sorted key order, each
draw scaled by the kind of tensor (named below) so that the tiny networks stay numerically healthy
(unit-scale activations, logits of order one, attention not washed out). Constant buffers of the
official layout (masks, level indices, zero biases) are not drawn: they keep the model's own values.
A SHA-256 of the rebuilt weights is stored with every golden file, so a change of torch's normal
generator would fail loudly ("regenerate") instead of silently comparing different networks.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GOLDEN_DIR = Path(__file__).resolve().parent

# Official constant buffers: never drawn, they keep the value the model builds.
_FIXED = re.compile(r"(^|\.)(lvl_1L|attn_bias_for_masking|zero_k_bias|ema_vocab_hit_SV|mask)$")


def kind_scale(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the seeded tensor `key`.

    - attention logit scales `scale_mul_1H11` (log-space; VAR and Infinity attn_l2_norm): log(16) +- 0.2,
      so l2-normalised attention is sharp enough that dropping the scale changes the outputs;
    - 1-D `.weight` (every norm's gain): 1 +- 0.1;
    - 1-D `.bias`: 0 +- 0.1;
    - embeddings (class / level / codebook / word rows): 0 +- 1;
    - matrices and convolutions: 0 +- 1/sqrt(fan_in) (fan_in = product of all but the first dim),
      halved for AdaLN projections so the (1 + scale) gains stay near one;
    - other free tensors (pos_start, pos_1LC, cfg_uncond, ada_gss, special_token): 0 +- 0.5.
    """
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "scale_mul_1H11":
        return math.log(16.0), 0.2
    if len(shape) == 1 and leaf == "weight":
        return 1.0, 0.1
    if len(shape) == 1 and leaf == "bias":
        return 0.0, 0.1
    if leaf == "weight" and re.search(r"(class_emb|lvl_embed|embedding)$", key.rsplit(".", 1)[0]):
        return 0.0, 1.0
    if leaf == "weight":
        fan_in = math.prod(shape[1:])
        std = 1.0 / math.sqrt(fan_in)
        return 0.0, std * (0.5 if "ada_lin" in key else 1.0)
    return 0.0, 0.5


def seeded_state_dict(layout: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Seeded float32 weights for every key of `layout` (a state dict in the official key layout,
    whose values give the shapes and, for constant buffers, the values), in the same key order."""
    g = torch.Generator().manual_seed(seed)
    drawn = {}
    for key in sorted(layout):
        if _FIXED.search(key):
            continue
        shape = tuple(layout[key].shape)
        mean, std = kind_scale(key, shape)
        drawn[key] = torch.randn(shape, generator=g, dtype=torch.float32) * std + mean
    return {k: drawn.get(k, layout[k]).clone() for k in layout}


def fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """SHA-256 over keys, shapes, dtypes and bytes, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def probe_image(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A compact, complete witness of an image batch (B, 3, H, W): row and column means (every pixel
    counts), a subsample on a 32 x 32 grid (stride max(1, H // 32)) and a 32x32 centre crop. Each entry of a probe of `x` is within
    `tol` of the same entry for `y` whenever |x - y| <= tol everywhere (means add ~1e-7 of rounding)."""
    x = x.detach().float()
    H, W = x.shape[-2:]
    top, left = (H - 32) // 2, (W - 32) // 2
    s = max(1, H // 32)
    return {"row_mean": x.mean(-1), "col_mean": x.mean(-2), "strided": x[..., ::s, ::s].contiguous(),
            "crop32": x[..., top:top + 32, left:left + 32].contiguous()}


def assert_probe_close(x: torch.Tensor, stored: dict[str, torch.Tensor], name: str, atol: float) -> None:
    """Compare `probe_image(x)` with the probe stored under `name.*` (same tolerance as the full image)."""
    for key, value in probe_image(x).items():
        ref = stored[f"{name}.{key}"]
        assert value.shape == ref.shape, f"{name}.{key}: shape {tuple(value.shape)} != {tuple(ref.shape)}"
        err = (value - ref).abs().max().item()
        assert err <= atol, f"{name}.{key}: max |difference| {err:.3g} > {atol:g}"


def image_from_small(small_u8: torch.Tensor, factor: int) -> torch.Tensor:
    """Input image in [-1, 1] from a stored uint8 thumbnail (B, 3, h, w), enlarged by pixel repetition:
    exact in float32, so the full-size input need not be stored."""
    x = small_u8.float() / 127.5 - 1.0
    return x.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def bits_to_int(bits: torch.Tensor) -> torch.Tensor:
    """(..., d) bits in {0, 1}, bit 0 most significant -> (...) int64 (compact storage of bit maps)."""
    d = bits.shape[-1]
    return (bits.long() << torch.arange(d - 1, -1, -1)).sum(-1)


def int_to_bits(idx: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of `bits_to_int`: (...) -> (..., d) uint8."""
    return ((idx.long()[..., None] >> torch.arange(d - 1, -1, -1)) & 1).to(torch.uint8)


def save_golden(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write `path` (.safetensors: tensors, contiguous, with `config` as JSON in the metadata)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"config": json.dumps(config, sort_keys=True)})
    tmp.chmod(0o644)
    tmp.replace(path)


def load_golden(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of tests/golden/`name`."""
    from safetensors import safe_open

    path = GOLDEN_DIR / name
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    return config, load_file(str(path))

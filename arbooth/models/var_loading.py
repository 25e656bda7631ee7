"""Loading the released VAR checkpoints and writing the official layout back (tiny random models: arbooth/toy/tiny.py).

`load_var(depth=16, vae_ckpt=..., var_ckpt=...)` builds the tokenizer and transformer on the `meta`
device (no memory, no initialisation), checks each checkpoint's keys and shapes against the model and
raises `CheckpointError` listing the first missing, unexpected and mis-shaped keys, then loads the
tensors in place (`assign=True`), so the weights are read once.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from arbooth.checkpoint import read_state_dict, state_dict_mismatch
from arbooth.errors import CheckpointError, ConfigError
from arbooth.models.var import VAE_PRESET, VAR, VAR_PRESETS, is_official_buffer, to_official_name
from arbooth.models.vqvae import VAE_DROPPED_KEYS, VQVAE
from arbooth.precision import torch_dtype


def official_state_dict(model: VAR | VQVAE, include_buffers: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights under the official key names and shapes (FoundationVision/VAR), so a
    fine-tuned (and merged) model loads in the official code. With `include_buffers`, the official
    constant buffers are added too (`lvl_1L`, `attn_bias_for_masking`, `*.zero_k_bias`,
    `quantize.ema_vocab_hit_SV`), for the official `load_state_dict(strict=True)`."""
    if isinstance(model, VQVAE):
        sd = dict(model.state_dict())
        if include_buffers:
            w = model.quantize.embedding.weight
            sd["quantize.ema_vocab_hit_SV"] = w.new_zeros(len(model.patch_nums), model.vocab_size)
        return sd
    if not isinstance(model, VAR):
        raise TypeError(f"expected a VAR or VQVAE (merge adapters first), got {type(model).__name__}")
    sd = {to_official_name(k): v for k, v in model.state_dict().items()}
    if include_buffers:
        w = model.head.weight
        lvl_L = model.levels(w.device)
        sd["lvl_1L"] = lvl_L.unsqueeze(0)
        mask_LL = lvl_L[:, None] >= lvl_L[None, :]
        sd["attn_bias_for_masking"] = torch.zeros_like(mask_LL, dtype=w.dtype).masked_fill(~mask_LL, -torch.inf)[None, None]
        for i in range(model.depth):
            sd[f"blocks.{i}.attn.zero_k_bias"] = w.new_zeros(model.C)
    return sd


def _checked(model: VAR | VQVAE, sd: dict[str, torch.Tensor], what: str, path: str | os.PathLike,
             depth: int | None = None) -> dict[str, torch.Tensor]:
    expected = {k: tuple(v.shape) for k, v in official_state_dict(model).items()}
    buffers = [k for k in sd if (is_official_buffer(k) if isinstance(model, VAR) else k in VAE_DROPPED_KEYS)]
    report = state_dict_mismatch(expected, sd, ignore=buffers)
    if report is None:
        return {k: v for k, v in sd.items() if k not in buffers}
    hint = ""
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if depth is not None and blocks and max(blocks) + 1 != depth:
        hint = f"\n  it holds {max(blocks) + 1} blocks: a d{max(blocks) + 1} checkpoint? (asked for depth={depth})"
    raise CheckpointError(f"{path} does not match {what}:\n{report}{hint}")


def load_var(
    depth: int = 16,
    vae_ckpt: str | os.PathLike | None = None,
    var_ckpt: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> VAR:
    """Build a released VAR size (depth 16, 20, 24 or 30: FoundationVision/VAR models/__init__.py
    build_vae_var) and load the official `vae_ch160v4096z32.pth` and `var_d{depth}.pth` (or
    `.safetensors`; `.pth` read with `torch.load(weights_only=True)`). `dtype` is the transformer's weight
    dtype (the tokenizer stays fp32). Returns the VAR in eval mode on `device`, frozen, with its
    tokenizer at `var.vae` (as `load_infinity` returns Infinity with its VAE at `model.vae`); it
    generates 256x256 images of the 1000 ImageNet classes. Raises ConfigError for an unreleased depth
    or a missing path, CheckpointError listing the first missing, unexpected and mis-shaped keys when
    a file does not fit."""
    if depth not in VAR_PRESETS:
        raise ConfigError(f"no released VAR of depth {depth}; choose one of {sorted(VAR_PRESETS)}")
    if vae_ckpt is None or var_ckpt is None:
        raise ConfigError("load_var needs both vae_ckpt (vae_ch160v4096z32.pth) and var_ckpt (var_d{depth}.pth)")
    with torch.device("meta"):
        var = VAR(VQVAE(**VAE_PRESET), **VAR_PRESETS[depth])
    return load_official_weights(var, vae_ckpt=vae_ckpt, var_ckpt=var_ckpt, device=device, dtype=dtype)


def load_official_weights(
    var: VAR,
    *,
    vae_ckpt: str | os.PathLike,
    var_ckpt: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> VAR:
    """Load official-layout checkpoints into `var` and its tokenizer `var.vae` (built on any device,
    `meta` included: the checkpoint tensors replace the parameters). Checks every key and shape first."""
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    for path in (vae_ckpt, var_ckpt):  # fail before reading gigabytes when the other file is missing
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
    var_sd = _checked(var, read_state_dict(var_ckpt), f"VAR d{var.depth} (width {var.C})", var_ckpt, depth=var.depth)
    vae_sd = _checked(var.vae, read_state_dict(vae_ckpt), "the VAR tokenizer", vae_ckpt)
    var.vae.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in vae_sd.items()}, assign=True)
    var.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in var_sd.items()}, assign=True)
    var.vae.eval().requires_grad_(False)
    return var.eval()

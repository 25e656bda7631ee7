"""Released Infinity checkpoints: our weights written back in the released layout, and `load_infinity`.

The released -> ours key conversion is in arbooth/models/infinity_keys.py (Infinity applies it when
loading a state dict).

The release (infinity/models/infinity.py, basic.py) fuses q/k/v into `mat_qkv` (cross-attention:
`mat_kv`) with loose `q_bias`/`v_bias` tensors and an all-zero `zero_k_bias` buffer, names the
attention-pool query `text_proj_for_sos.ca.mat_q`, and registers blocks as
`block_chunks.{c}.module.{j}`. We use plain nn.Linear q/k/v (peft/Opacus friendly) and `blocks.{i}`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from arbooth.checkpoint import file_sha256, read_state_dict
from arbooth.errors import CheckpointError, ConfigError
from arbooth.models.bsq_vae import BSQVAE
from arbooth.models.infinity import CrossAttention, Infinity, SelfAttention
from arbooth.models.infinity_keys import from_official_keys, to_official_name

__all__ = ["from_official_keys", "infinity_2b_base", "load_infinity", "official_state_dict"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _official_attention(name: str, m: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One attention module's entries in the released names and order (basic.py)."""
    zeros = torch.zeros_like(m.v.bias)
    proj = {f"{name}.proj.weight": m.proj.weight, f"{name}.proj.bias": m.proj.bias}
    if hasattr(m, "head_scale"):  # self-attention
        qkv = torch.cat([m.q.weight, m.k.weight, m.v.weight])
        return {f"{name}.scale_mul_1H11": m.head_scale.scale_mul_1H11, f"{name}.q_bias": m.q.bias, f"{name}.v_bias": m.v.bias,
                f"{name}.zero_k_bias": zeros, f"{name}.mat_qkv.weight": qkv, **proj}
    kv = {f"{name}.mat_kv.weight": torch.cat([m.k.weight, m.v.weight])}
    if hasattr(m, "query"):  # text attention pool
        return {f"{name}.mat_q": m.query.mat_q, f"{name}.v_bias": m.v.bias, f"{name}.zero_k_bias": zeros, **kv, **proj}
    return {f"{name}.v_bias": m.v.bias, f"{name}.zero_k_bias": zeros, f"{name}.mat_q.weight": m.q.weight,
            f"{name}.mat_q.bias": m.q.bias, **kv, **proj}


def official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the released layout and order of keys (see the module docstring)."""
    per_chunk = model.depth // model.block_chunks
    attn = {n: m for n, m in model.named_modules() if isinstance(m, (SelfAttention, CrossAttention))}

    def rename(key: str) -> str:
        key = to_official_name(key)
        m = _BLOCK.match(key)
        if m:
            i = int(m[1])
            return f"block_chunks.{i // per_chunk}.module.{i % per_chunk}." + key[m.end():]
        return key.replace("text_proj_for_sos.", "text_proj_for_sos.ca.", 1)

    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        owner = next((n for n in attn if key.startswith(n + ".")), None)
        if owner is None:
            out[rename(key)] = value
        elif rename(owner) + ".proj.bias" not in out:
            out.update({rename(k): v.detach() for k, v in _official_attention(owner, attn[owner]).items()})
    return out


def load_infinity(model_ckpt: str | os.PathLike, vae_ckpt: str | os.PathLike, *, device: str | torch.device = "cpu",
                  vae_kwargs: dict | None = None, model_kwargs: dict | None = None) -> Infinity:
    """The released Infinity with its BSQ-VAE at `model.vae`, as `load_var` returns VAR with its tokenizer
    at `var.vae`; both frozen, eval mode, fp32, on `device`.

    Builds BSQVAE + Infinity (the d32 VAE / 2B transformer of FoundationVision/Infinity
    `infinity_vae_d32_reg.pth`, `infinity_2b_reg.pth` unless the kwargs say otherwise) on the meta
    device, so no memory is spent on random weights, then loads both checkpoints strictly (the
    released key layout is converted, arbooth/models/infinity_keys.py). `.pth` (read with
    `torch.load(weights_only=True)`) or `.safetensors`. Raises CheckpointError naming the file when a
    checkpoint is missing, unreadable or does not fit the model.
    """
    vae_sd, sd = _read_vae(vae_ckpt), read_state_dict(model_ckpt)
    with torch.device("meta"):
        vae = BSQVAE(**(vae_kwargs or {}))
        model = Infinity(vae, **(model_kwargs or {}))
    for name, module, weights in (("VAE", vae, vae_sd), ("Infinity", model, sd)):
        try:
            module.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"{name} checkpoint does not match the model: {e}") from e
    vae.eval().requires_grad_(False).to(device)
    return model.eval().requires_grad_(False).to(device)


def infinity_2b_base(model_cfg, model_kwargs: dict) -> tuple:
    """`model.preset=infinity_2b`: the released Infinity-2B, its BSQ-VAE and flan-t5-xl as (vae, model,
    tokenizer, t5_encoder, base_id), frozen, eval mode, on the CPU (T5 in bf16). `model_cfg` names the
    files (`model_ckpt`, `vae_ckpt`, `t5`); `base_id` records the transformer file's SHA-256.
    Raises ConfigError when a path is not set, CheckpointError when a file is missing or does not fit."""
    missing = [k for k in ("model_ckpt", "vae_ckpt", "t5") if not getattr(model_cfg, k)]
    if missing:
        raise ConfigError(f"model.{', model.'.join(missing)} must be given for preset {model_cfg.preset} "
                          "(or use model.preset=tiny / --tiny to try the recipe without weights)")
    from transformers import AutoTokenizer, T5EncoderModel

    model = load_infinity(model_cfg.model_ckpt, model_cfg.vae_ckpt, model_kwargs=model_kwargs)
    vae = model.vae
    if not Path(model_cfg.t5).is_dir():
        raise CheckpointError(f"T5 folder not found: {model_cfg.t5} (download google/flan-t5-xl)")
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.t5, legacy=True)
    encoder = T5EncoderModel.from_pretrained(model_cfg.t5, torch_dtype=torch.bfloat16).eval().requires_grad_(False)
    return vae, model, tokenizer, encoder, f"{Path(model_cfg.model_ckpt).name} sha256={file_sha256(model_cfg.model_ckpt)}"


def _read_vae(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The released VAE file is {'vae': state_dict, ...} (bsq_vae/vae.py vae_model reads ckpt['vae'])."""
    if str(path).endswith(".pth") and os.path.isfile(path):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
        if isinstance(raw, dict) and isinstance(raw.get("vae"), dict):
            return raw["vae"]
    return read_state_dict(path)

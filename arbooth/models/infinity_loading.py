"""Released Infinity checkpoints: our weights written back in the released layout, `load_infinity` (one
file, or the sharded folder of the 8B release), and the base-model builders of the subject recipe.

The released -> ours key conversion is in arbooth/models/infinity_keys.py (Infinity applies it when
loading a state dict).

The release (infinity/models/infinity.py, basic.py) fuses q/k/v into `mat_qkv` (cross-attention:
`mat_kv`) with loose `q_bias`/`v_bias` tensors and an all-zero `zero_k_bias` buffer, names the
attention-pool query `text_proj_for_sos.ca.mat_q`, and registers blocks as
`block_chunks.{c}.module.{j}`. We use plain nn.Linear q/k/v (peft/Opacus friendly) and `blocks.{i}`.

Infinity-8B ships as a folder (tools/run_infinity.py `checkpoint_type='torch_shard'`, read there with
transformers' `load_sharded_checkpoint`): an index `model.safetensors.index.json` or
`pytorch_model.bin.index.json` whose `weight_map` names the shard file of every key. `load_sharded`
checks the index against the model first (missing shard files, missing or unexpected keys: one line),
then loads shard by shard into a model built on the meta device (`assign=True`), so at most one shard
is held besides the weights already placed: never two full copies.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from arbooth.checkpoint import file_sha256, read_state_dict
from arbooth.errors import CheckpointError, ConfigError
from arbooth.models.bsq_vae import BSQVAE
from arbooth.models.infinity import INFINITY_PRESETS, CrossAttention, Infinity, SelfAttention
from arbooth.models.infinity_keys import from_official_keys, to_official_name
from arbooth.models.infinity_schedule import infinity_scale_schedule

__all__ = ["from_official_keys", "infinity_2b_base", "infinity_8b_512_base", "infinity_8b_512_schedule",
           "infinity_8b_base", "load_infinity", "load_sharded", "official_state_dict"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# transformers' SAFE_WEIGHTS_INDEX_NAME and WEIGHTS_INDEX_NAME, in load_sharded_checkpoint's order of preference
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_OPTIONAL = re.compile(r"(^|\.)zero_k_bias$")  # all-zero buffers a writer may leave out


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


# ----------------------------------------------------------------------------- sharded folders


def shard_index(folder: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """(index path, key -> shard file name) of a sharded checkpoint folder. Raises CheckpointError (one
    line) when the folder has no index, the index is not a `weight_map`, or shard files are missing."""
    folder = Path(folder)
    index = next((folder / n for n in INDEX_NAMES if (folder / n).is_file()), None)
    if index is None:
        raise CheckpointError(f"{folder} has no {' or '.join(INDEX_NAMES)} (a sharded checkpoint folder needs one)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the shard index {index}: {type(e).__name__}: {e}") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map is empty or not a mapping")
    missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
    if missing:
        raise CheckpointError(f"{index} names {len(missing)} shard file(s) missing from {folder}: {', '.join(missing)}")
    return index, weight_map


def _key_report(name: str, missing: list[str], unexpected: list[str], limit: int = 6) -> str:
    parts = [f"{len(v)} {what} key(s): {', '.join(v[:limit])}{', ...' if len(v) > limit else ''}"
             for what, v in (("missing", missing), ("unexpected", unexpected)) if v]
    return f"{name} does not match the model: " + "; ".join(parts)


def load_sharded(model: torch.nn.Module, folder: str | os.PathLike, expected_keys: set[str],
                 our_keys: set[str] | None = None) -> None:
    """Load a sharded checkpoint folder into `model` strictly, shard by shard (`assign=True`: a model
    built on the meta device takes the shard tensors themselves, so no second copy is made).

    `expected_keys`: the keys the folder must hold (the released layout); keys matching `zero_k_bias`
    may be absent. `our_keys`: a second accepted layout (the model's own `state_dict` names). The index
    is checked before any shard is read, and every model entry must be filled by the end. Raises
    CheckpointError with one line naming missing shard files, or missing / unexpected keys.
    """
    index, weight_map = shard_index(folder)
    keys, reports = set(weight_map), []
    for layout in [expected_keys] + ([our_keys] if our_keys else []):
        missing = sorted(k for k in layout - keys if not _OPTIONAL.search(k))
        unexpected = sorted(keys - layout)
        if not missing and not unexpected:
            break
        reports.append((len(missing) + len(unexpected), missing, unexpected))
    else:  # no layout fits: report the closest
        _, missing, unexpected = min(reports)
        raise CheckpointError(_key_report(f"sharded checkpoint {index}", missing, unexpected))
    pending = set(model.state_dict(keep_vars=True))
    for shard in sorted(set(weight_map.values())):  # one shard in memory at a time
        path = Path(folder) / shard
        # fp32 like the official fp32 model that load_sharded_checkpoint copies into (shards may be bf16)
        sd = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(path).items()}
        stray = sorted(k for k in sd if weight_map.get(k) != shard)
        if stray:  # the index is what was checked above: a shard holding other keys is a broken folder
            raise CheckpointError(_key_report(f"shard {path} (keys its index assigns elsewhere)", [], stray))
        try:
            result = model.load_state_dict(sd, strict=False, assign=True)
        except RuntimeError as e:  # size mismatch
            raise CheckpointError(f"shard {path} does not match the model: {' '.join(str(e).split())}") from e
        if result.unexpected_keys:
            raise CheckpointError(_key_report(f"shard {path}", [], sorted(result.unexpected_keys)))
        pending -= pending - set(result.missing_keys)  # what this shard filled
        del sd
    if pending:
        raise CheckpointError(_key_report(f"sharded checkpoint {index}", sorted(pending), []))


def folder_sha256(folder: str | os.PathLike) -> str:
    """SHA-256 over the shard index and every shard's SHA-256 (sorted by name): the id of a sharded base."""
    index, weight_map = shard_index(folder)
    h = hashlib.sha256(index.read_bytes())
    for shard in sorted(set(weight_map.values())):
        h.update(file_sha256(Path(folder) / shard).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- loading


def released_preset(vae_sd: dict[str, torch.Tensor]) -> str | None:
    """The release a VAE state dict belongs to, by its bit depth (`lfq.mask`: 32 -> 2B, 14 -> 8B); None if neither."""
    mask = next((v for k, v in vae_sd.items() if k.endswith("lfq.mask")), None)
    return None if mask is None else {32: "infinity_2b", 14: "infinity_8b"}.get(mask.numel())


def load_infinity(model_ckpt: str | os.PathLike, vae_ckpt: str | os.PathLike, *, device: str | torch.device = "cpu",
                  vae_kwargs: dict | None = None, model_kwargs: dict | None = None,
                  preset: str | None = None) -> Infinity:
    """The released Infinity with its BSQ-VAE at `model.vae`, as `load_var` returns VAR with its tokenizer
    at `var.vae`; both frozen, eval mode, fp32, on `device`.

    Sizes: those of `preset` (a key of `INFINITY_PRESETS`) when given; else, without `vae_kwargs`, those
    of the release the VAE file belongs to (`INFINITY_PRESETS`:
    `infinity_vae_d32_reg.pth` -> Infinity-2B, `infinity_vae_d56_f8_14_patchify.pth` -> Infinity-8B with
    spatial patchify; other files: the constructor defaults, which are 2B); with `vae_kwargs` (and no
    `preset`), the constructor defaults. `vae_kwargs` and `model_kwargs` apply on top. Both are built on the meta device, so
    no memory is spent on random weights, then loaded strictly (the released key layout is converted,
    arbooth/models/infinity_keys.py). `model_ckpt`: a `.pth` (read with `torch.load(weights_only=True)`)
    or `.safetensors` file, or a sharded folder (the 8B release, `load_sharded`). Raises CheckpointError
    naming the file when a checkpoint is missing, unreadable or does not fit the model.
    """
    vae_sd = _read_vae(vae_ckpt)
    if preset is not None and preset not in INFINITY_PRESETS:
        raise ConfigError(f"unknown Infinity preset {preset!r}; choose one of {sorted(INFINITY_PRESETS)}")
    preset = preset or (None if vae_kwargs else released_preset(vae_sd))
    vae_kw = {**(INFINITY_PRESETS[preset]["vae"] if preset else {}), **(vae_kwargs or {})}
    model_kw = {**(INFINITY_PRESETS[preset]["model"] if preset else {}), **(model_kwargs or {})}
    with torch.device("meta"):
        vae = BSQVAE(**vae_kw)
        model = Infinity(vae, **model_kw)
    try:
        vae.load_state_dict(vae_sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"VAE checkpoint does not match the model: {e}") from e
    if Path(model_ckpt).is_dir():
        load_sharded(model, model_ckpt, set(official_state_dict(model)), set(model.state_dict()))
    else:
        try:
            model.load_state_dict(read_state_dict(model_ckpt), strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"Infinity checkpoint does not match the model: {e}") from e
    vae.eval().requires_grad_(False).to(device)
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------- subject-recipe base models


def _released_base(model_cfg, model_kwargs: dict, preset: str, files: str) -> tuple:
    """(vae, model, tokenizer, t5_encoder, base_id) of one release; see `infinity_2b_base`."""
    missing = [k for k in ("model_ckpt", "vae_ckpt", "t5") if not getattr(model_cfg, k)]
    if missing:
        raise ConfigError(f"model.{', model.'.join(missing)} must be given for preset {model_cfg.preset} ({files}; "
                          "or use model.preset=tiny / --tiny to try the recipe without weights)")
    absent = [f"model.{k}={getattr(model_cfg, k)}" for k in ("model_ckpt", "vae_ckpt", "t5")
              if not Path(getattr(model_cfg, k)).exists()]
    if absent:  # every missing file in one line, before any is read
        raise CheckpointError(f"not found: {', '.join(absent)} (preset {model_cfg.preset} needs {files} and a "
                              "flan-t5-xl folder)")
    from transformers import AutoTokenizer, T5EncoderModel

    # model.model_kwargs / model.vae_kwargs: sizes over the release's (a checkpoint of its family at other sizes)
    model = load_infinity(model_cfg.model_ckpt, model_cfg.vae_ckpt, preset=preset,
                          model_kwargs={**(getattr(model_cfg, "model_kwargs", None) or {}), **model_kwargs},
                          vae_kwargs=getattr(model_cfg, "vae_kwargs", None))
    vae = model.vae
    if not Path(model_cfg.t5).is_dir():
        raise CheckpointError(f"T5 folder not found: {model_cfg.t5} (download google/flan-t5-xl)")
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.t5, legacy=True)
    encoder = T5EncoderModel.from_pretrained(model_cfg.t5, torch_dtype=torch.bfloat16).eval().requires_grad_(False)
    ckpt = Path(model_cfg.model_ckpt)
    return vae, model, tokenizer, encoder, f"{ckpt.name} sha256={folder_sha256(ckpt) if ckpt.is_dir() else file_sha256(ckpt)}"


def infinity_2b_base(model_cfg, model_kwargs: dict) -> tuple:
    """`model.preset=infinity_2b`: the released Infinity-2B, its BSQ-VAE and flan-t5-xl as (vae, model,
    tokenizer, t5_encoder, base_id), frozen, eval mode, on the CPU (T5 in bf16). `model_cfg` names the
    files (`model_ckpt`, `vae_ckpt`, `t5`); `base_id` records the transformer file's SHA-256.
    Raises ConfigError when a path is not set, CheckpointError when a file is missing or does not fit."""
    return _released_base(model_cfg, model_kwargs, "infinity_2b", "infinity_2b_reg.pth, infinity_vae_d32_reg.pth")


def infinity_8b_base(model_cfg, model_kwargs: dict) -> tuple:
    """`model.preset=infinity_8b`: the released Infinity-8B at 1024x1024, as `infinity_2b_base`: `model_ckpt`
    the sharded `infinity_8b_weights` folder (or one file), `vae_ckpt` `infinity_vae_d56_f8_14_patchify.pth`,
    `t5` flan-t5-xl; `base_id`: SHA-256 over the index and every shard. Schedule: the recipe's released one."""
    return _released_base(model_cfg, model_kwargs, "infinity_8b",
                          "infinity_8b_weights/, infinity_vae_d56_f8_14_patchify.pth")


def infinity_8b_512_base(model_cfg, model_kwargs: dict) -> tuple:
    """`model.preset=infinity_8b_512`: the 512x512 Infinity-8B checkpoint (the architecture and tokenizer of
    `infinity_8b`, its own weights folder); schedule: `infinity_8b_512_schedule`."""
    return _released_base(model_cfg, model_kwargs, "infinity_8b",
                          "the 512x512 Infinity-8B weights folder, infinity_vae_d56_f8_14_patchify.pth")


def infinity_8b_512_schedule(model_cfg) -> list[tuple[int, int, int]]:
    """Schedule of the 512x512 checkpoint: '0.25M' (10 scales, last map 32 x 32 tokens = 512 px) for
    `model.h_div_w`. `model.pn` '0.06M' picks the smaller schedule; '1M' (the config default) means
    '0.25M' here; '0.60M' is refused (ConfigError): beyond what that checkpoint was made for."""
    if model_cfg.pn == "0.60M":
        raise ConfigError("model.pn=0.60M is beyond the 512x512 Infinity-8B checkpoint; use 0.25M or 0.06M")
    pn = "0.06M" if model_cfg.pn == "0.06M" else "0.25M"
    return [tuple(s) for s in infinity_scale_schedule(model_cfg.h_div_w, pn)]


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

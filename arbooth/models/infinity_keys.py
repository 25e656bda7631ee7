"""Released Infinity key layout -> our module names (used by `Infinity` when it loads a state dict).

The release (infinity/models/infinity.py, basic.py) fuses q/k/v into `mat_qkv` (cross-attention:
`mat_kv`) with loose `q_bias`/`v_bias` tensors and an all-zero `zero_k_bias` buffer, names the
attention-pool query `text_proj_for_sos.ca.mat_q`, and registers blocks as
`block_chunks.{c}.module.{j}`. We use plain nn.Linear q/k/v (peft/Opacus friendly) and `blocks.{i}`,
and keep every raw parameter in a leaf module (arbooth/models/leaf_params.py): the renames are listed
once, in `_RENAMES`. Files written before those leaf modules existed (the raw names, e.g. a full
personalization with self-attention tuned) load through the same renames.
The way back is `official_state_dict` in arbooth/models/infinity_loading.py.
"""
from __future__ import annotations

import re

import torch

from arbooth.errors import CheckpointError
from arbooth.models.key_renames import KeyRenames

_CHUNK = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.")

UNCOND_KEY = "uncond.cfg_uncond"
# (our name, released name once blocks are `blocks.{i}`); {i} is a block index
_RENAMES = (
    (UNCOND_KEY, "cfg_uncond"),
    ("start.pos_start", "pos_start"),
    ("text_proj_for_sos.query.mat_q", "text_proj_for_sos.query"),
    ("blocks.{i}.sa.head_scale.scale_mul_1H11", "blocks.{i}.sa.scale_mul_1H11"),
    ("blocks.{i}.ada_gss.gss", "blocks.{i}.ada_gss"),
)
_KEYS = KeyRenames(_RENAMES)


def to_official_name(key: str) -> str:
    """Our name of a raw parameter -> the released one (blocks still `blocks.{i}`); others unchanged."""
    return _KEYS.to_official(key)


def from_official_name(key: str) -> str:
    """The released (or pre-leaf-module arbooth) name of a raw parameter -> ours; others unchanged."""
    return _KEYS.from_official(key)


def from_official_keys(sd: dict[str, torch.Tensor], blocks_per_chunk: int) -> dict[str, torch.Tensor]:
    """Released key layout -> ours. Keys already in our layout pass through unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _CHUNK.match(key)
        if m:
            key = f"blocks.{int(m[1]) * blocks_per_chunk + int(m[2])}." + key[m.end():]
        key = key.replace("text_proj_for_sos.ca.mat_q", "text_proj_for_sos.query").replace("text_proj_for_sos.ca.", "text_proj_for_sos.")
        base, _, leaf = key.rpartition(".")
        if leaf == "zero_k_bias":
            if value.count_nonzero() != 0:
                raise CheckpointError(f"{key} is not all zero; cannot drop it")
            continue
        if key.endswith(".mat_qkv.weight"):
            owner = key[: -len(".mat_qkv.weight")]
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{owner}.{name}.weight"] = part
        elif key.endswith(".mat_kv.weight"):
            owner = key[: -len(".mat_kv.weight")]
            out[f"{owner}.k.weight"], out[f"{owner}.v.weight"] = value.chunk(2)
        elif leaf in ("q_bias", "v_bias"):
            out[f"{base}.{leaf[0]}.bias"] = value
        elif key.endswith((".mat_q.weight", ".mat_q.bias")):
            out[key.replace(".mat_q.", ".q.")] = value
        else:
            out[from_official_name(key)] = value
    return out

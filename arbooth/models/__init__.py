"""Model families. Names are resolved lazily so that importing one family never pays for another.

VAR family (class-conditional, next-scale):      VQVAE, VAR, load_var, official_state_dict
Infinity family (text-to-image, bitwise tokens):   BSQVAE, Infinity, INFINITY_PRESETS, infinity_scale_schedule,
                                                   load_infinity, T5TextEncoder
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VQVAE": "arbooth.models.vqvae",
    "VAR": "arbooth.models.var",
    "load_var": "arbooth.models.var_loading",
    "load_official_weights": "arbooth.models.var_loading",
    "official_state_dict": "arbooth.models.var_loading",
    "VAR_PRESETS": "arbooth.models.var",
    "BSQVAE": "arbooth.models.bsq_vae",
    "Infinity": "arbooth.models.infinity",
    "INFINITY_PRESETS": "arbooth.models.infinity",
    "infinity_scale_schedule": "arbooth.models.infinity_schedule",
    "load_infinity": "arbooth.models.infinity_loading",
    "T5TextEncoder": "arbooth.models.t5",
}
# Both families have an `official_state_dict`; the bare name is VAR's (issue 2's public API).
_ALIASES = {"infinity_official_state_dict": ("arbooth.models.infinity_loading", "official_state_dict")}

__all__ = [
    "BSQVAE",
    "INFINITY_PRESETS",
    "VAR",
    "VAR_PRESETS",
    "VQVAE",
    "Infinity",
    "T5TextEncoder",
    "infinity_official_state_dict",
    "infinity_scale_schedule",
    "load_infinity",
    "load_official_weights",
    "load_var",
    "official_state_dict",
]


def __getattr__(name: str) -> Any:
    if name in _ALIASES:
        module, attr = _ALIASES[name]
        return getattr(importlib.import_module(module), attr)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'arbooth.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__

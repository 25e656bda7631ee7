"""One precision policy: a `dtype` string picks the autocast context; trainable weights stay fp32."""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def autocast(dtype: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast for `dtype` on `device`; a no-op for fp32 (and for fp16 on the CPU, which autocast lacks)."""
    device_type = torch.device(device).type
    td = torch_dtype(dtype)
    if td is torch.float32 or (device_type == "cpu" and td is torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=td)

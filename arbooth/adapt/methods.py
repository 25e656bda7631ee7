"""Adaptation methods for the class-conditional VAR transformer: which parameters train.

Each method is a function of a model and a name (STYLE habit 8): `prepare_for_method(var, "lora")`
returns the model, peft-wrapped where needed, with exactly that method's parameters requiring grad.

- `fft`: every transformer parameter trains (the VQVAE tokenizer is not a submodule of VAR: never trained).
- `lora`: peft LoRA (rank 16, alpha 2 * rank = 32, dropout 0) on each block's attention `mat_qkv` and `proj`, MLP
  `fc1` and `fc2` and AdaLN `ada_lin.1` linear: the paper's "LoRA-AM + LN" setting (6.03M trainable at
  d16, 9.42M at d20). `head_nm.ada_lin.1` is not a target: counting it would give 6.08M at d16, while the
  paper reports 6.02M, so the paper adapts the blocks only.
- `lora_attn` / `lora_mlp`: the paper's ablations, LoRA on qkv+proj (1.57M at d16) or fc1+fc2 (2.62M).
- `lntuning`: peft LNTuning on the blocks' `ada_lin.1` (the AdaLN projections that produce the
  LayerNorm scale/shift): peft trains a copy of each target and freezes the original (100.76M at d16).

Target patterns are regular expressions matched against full module names (`re.fullmatch`, as peft
does for a string `target_modules`); a pattern that matches no module is an error, never a no-op.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from arbooth.errors import ConfigError

log = logging.getLogger(__name__)

def resolve_lora_alpha(rank: int, alpha: float | None = None) -> float:
    """The LoRA alpha in use: `alpha` when set, else 2 * `rank`, so the scale alpha / rank is 2 at every rank
    (the class paper's r=16 alpha=32; the subject recipe follows it, docs/arbooth.md "LoRA"). The one
    owner of the rule: both LoRA configs' `alpha` properties, `prepare_for_method` and `LoRATuner` call it."""
    return alpha if alpha is not None else 2 * rank


METHODS = ("fft", "lora", "lora_attn", "lora_mlp", "lntuning")
PEFT_METHODS = ("lora", "lora_attn", "lora_mlp", "lntuning")


@dataclass(frozen=True)
class MethodConfig:
    """The `method` section of the class-conditional config (arbooth/recipes/class_config.py)."""

    name: str = "lora"                    # one of METHODS
    lora_rank: int = 16
    lora_alpha: int | None = None         # None: 2 * lora_rank, as the authors' code (`alpha` below)
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"method.name {self.name!r} is not one of {', '.join(METHODS)}")
        if self.lora_rank < 1:
            raise ConfigError(f"method.lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"method.lora_alpha must be > 0 (or null for 2 * lora_rank), got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"method.lora_dropout must lie in [0, 1), got {self.lora_dropout}")

    @property
    def alpha(self) -> float:
        """The LoRA alpha in use: `lora_alpha` when set, else 2 * `lora_rank` (`resolve_lora_alpha`)."""
        return resolve_lora_alpha(self.lora_rank, self.lora_alpha)


_ATTN = (r"blocks\.\d+\.attn\.mat_qkv", r"blocks\.\d+\.attn\.proj")
_MLP = (r"blocks\.\d+\.ffn\.fc1", r"blocks\.\d+\.ffn\.fc2")
_ADALN = (r"blocks\.\d+\.ada_lin\.1",)

# method -> module-name patterns it adapts (fft has none: it trains everything)
TARGETS: dict[str, tuple[str, ...]] = {
    "lora": _ATTN + _MLP + _ADALN,
    "lora_attn": _ATTN,
    "lora_mlp": _MLP,
    "lntuning": _ADALN,
}


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable / 1e6:.2f}M of {self.total / 1e6:.2f}M "
                f"({self.percent:.3f}%)")


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameters (works on the `meta` device: only shapes are read)."""
    params = list(model.parameters())
    return ParamCount(trainable=sum(p.numel() for p in params if p.requires_grad),
                      total=sum(p.numel() for p in params))


def resolve_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Full names of the `nn.Linear` modules matched by `patterns`; ConfigError if any pattern matches none."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found: list[str] = []
    for pat in patterns:
        hits = [n for n in names if re.fullmatch(pat, n)]
        if not hits:
            raise ConfigError(f"target pattern `{pat}` matches no linear layer of {type(model).__name__}; "
                              f"linear layers look like: {', '.join(names[:6])}")
        found += [h for h in hits if h not in found]
    return found


def prepare_for_method(var: nn.Module, name: str, *, lora_rank: int = 16, lora_alpha: int | None = None,
                       lora_dropout: float = 0.0) -> nn.Module:
    """Return `var` ready for method `name` (one of METHODS): a `peft.PeftModel` for LoRA/LNTuning, the
    same module for FFT.

    Exactly the method's parameters require grad afterwards (counts at d16/d20 in the module
    docstring; the paper's Table 1 settings, Shaikh et al. 2025). LoRA: rank `lora_rank` >= 1, scale
    `lora_alpha / lora_rank` with `lora_alpha` defaulting to 2 * rank (the authors' code), dropout
    `lora_dropout` in [0, 1). The VQVAE tokenizer is not a submodule of VAR (see arbooth/models/var.py),
    so no method ever trains it. The input model is modified in place (peft injects its layers into it),
    so pass a fresh model per method. Raises ConfigError for an unknown method or a target pattern that
    matches no linear layer.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown adaptation method {name!r}; choose one of {', '.join(METHODS)}")
    if name == "fft":
        return var.requires_grad_(True)

    from peft import LNTuningConfig, LoraConfig, get_peft_model

    patterns = TARGETS[name]
    resolve_targets(var, patterns)  # loud error before peft sees a pattern that matches nothing
    target_regex = "|".join(f"(?:{p})" for p in patterns)
    if name == "lntuning":
        cfg = LNTuningConfig(target_modules=target_regex)
    else:
        cfg = LoraConfig(r=lora_rank, lora_alpha=resolve_lora_alpha(lora_rank, lora_alpha), lora_dropout=lora_dropout,
                         target_modules=target_regex, bias="none")
    model = get_peft_model(var, cfg)
    log.debug("%s: %s", name, count_parameters(model))
    return model


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The VAR inside a peft wrapper (with adapter layers still injected), or the model itself."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def merge_adapters(model: nn.Module) -> nn.Module:
    """A plain VAR with the adapters folded into its weights (LoRA merged, LNTuning copies swapped in)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model

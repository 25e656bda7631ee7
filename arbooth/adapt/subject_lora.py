"""LoRA for ARBooth: low-rank adapters on the layers selective tuning would train, and a teacher
that is the same model with the adapters switched off.

The full recipe (arbooth/adapt/selective.py) trains every weight of the chosen block sub-layers
(cross-attention + FFN by default, 1.61 B parameters at Infinity-2B) and keeps their original values
for the prior-distillation teacher. Here every `nn.Linear` of those sub-layers gets a peft LoRA
adapter instead (Hu et al. 2021, "LoRA"; W x + (alpha / r) B A x with A (r, in), B (out, r), B = 0 at
the start, so training starts from the base model exactly); the base weights stay frozen in the dtype
the recipe cast them to (bf16 at 2B) and the adapters are fp32 (peft's `autocast_adapter_dtype`), so
their AdamW moments are fp32 too. Non-linear parameters of the sub-layers (self-attention's per-head
`scale_mul`) stay frozen: only linear layers are adapted.

The teacher is the base model: inside `with tuner.teacher():` peft's `disable_adapter()` context skips
every adapter (the LoRA layers return their base layer's output unchanged), so no original weights
are stored at all. The model stays the plain Infinity (peft injects its layers into it in place); the
PeftModel wrapper is kept only for that context.

Adapter tensors are named like the model's modules without peft's adapter name:
`blocks.3.ca.q.lora_A.weight` (r, in) and `blocks.3.ca.q.lora_B.weight` (out, r).
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from arbooth.adapt.selective import CROSS_ATTENTION, FFN, tensors_sha256
from arbooth.errors import CheckpointError, ConfigError

ADAPTER = "default"  # peft's adapter name; dropped from the names we save
LORA_INITS = ("default", "gaussian")  # both start with B = 0, so the adapted model starts as the base


@dataclass(frozen=True)
class LoRASpec:
    """What a LoRA personalization needs to be rebuilt: rank, alpha and the adapted linear layers."""

    rank: int
    alpha: float
    targets: tuple[str, ...]   # full module names, e.g. blocks.0.ca.q
    dropout: float = 0.0
    init: str = "default"

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def peft_config(self):
        from peft import LoraConfig
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                          init_lora_weights=True if self.init == "default" else self.init,
                          target_modules="|".join(re.escape(t) for t in self.targets))


def lora_targets(model: nn.Module, kinds: Sequence[str] = (CROSS_ATTENTION, FFN)) -> tuple[str, ...]:
    """Names of every nn.Linear inside the `kinds` sub-layers of `model.blocks` (ConfigError if a
    kind matches nothing)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no `blocks` list to adapt")
    names = []
    for i, block in enumerate(blocks):
        for kind in kinds:
            sub = getattr(block, kind, None)
            linears = [n for n, m in sub.named_modules() if isinstance(m, nn.Linear)] if isinstance(sub, nn.Module) else []
            if not linears:
                raise ConfigError(f"block {i} has no linear layer in sub-layer {kind!r} (pattern matches nothing)")
            names += [f"blocks.{i}.{kind}.{n}" for n in linears]
    return tuple(names)


def base_weights_sha256(model: nn.Module, targets: Sequence[str], dtype: torch.dtype) -> str:
    """Hash of the base weights of the adapted layers, cast to `dtype` (the refusal on a wrong base).
    Works before and after injection (peft moves the weight to `<name>.base_layer.weight`)."""
    modules = dict(model.named_modules())
    out = {}
    for t in targets:
        m = modules.get(t)
        if m is None:
            raise CheckpointError(f"the model has no layer {t} that the personalization adapts")
        base = getattr(m, "base_layer", m)
        out[f"{t}.weight"] = base.weight.detach().to(dtype)
    return tensors_sha256(out)


def _saved_name(peft_name: str) -> str:
    return peft_name.replace(f".{ADAPTER}.", ".")


class LoRATuner:
    """Injects LoRA adapters into `model` (in place) on the linear layers of the `kinds` sub-layers of
    every block; everything else is frozen. Same interface as SelectiveTuner for the recipe."""

    def __init__(self, model: nn.Module, kinds: Sequence[str] = (CROSS_ATTENTION, FFN), *, rank: int = 16,
                 alpha: float | None = None, dropout: float = 0.0, init: str = "default") -> None:
        from peft import get_peft_model
        if rank < 1 or dropout < 0 or dropout >= 1 or init not in LORA_INITS:
            raise ConfigError(f"LoRA needs rank >= 1, 0 <= dropout < 1 and init in {LORA_INITS}")
        self.model, self.kinds = model, tuple(kinds)
        self.spec = LoRASpec(rank, float(2 * rank if alpha is None else alpha), lora_targets(model, kinds),
                             dropout, init)
        self.base_dtype = model.blocks[0].ffn.fc1.weight.dtype
        self.base_tuned_sha256 = base_weights_sha256(model, self.spec.targets, self.base_dtype)
        model.requires_grad_(False)
        # peft injects into `model` itself; adapters of bf16 layers are made fp32 (autocast_adapter_dtype)
        self.peft_model = get_peft_model(model, self.spec.peft_config(), autocast_adapter_dtype=True)
        self.params: dict[str, nn.Parameter] = {_saved_name(n): p for n, p in model.named_parameters()
                                                if ".lora_" in n}
        for p in self.params.values():
            p.requires_grad_(True)
        # peft ties nothing else to requires_grad; check we train exactly the adapters
        extra = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
        if extra:
            raise RuntimeError(f"LoRA left base parameters trainable: {extra[:3]}")

    # ---- what trains ----
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def summary(self) -> str:
        total = sum(p.numel() for n, p in self.model.named_parameters() if ".lora_" not in n)
        n = self.num_trainable()
        return (f"LoRA r={self.spec.rank} alpha={self.spec.alpha:g} on {len(self.spec.targets)} linear layers "
                f"({'+'.join(self.kinds)} of {len(self.model.blocks)} blocks): {n:,} trainable, base {total:,} "
                f"frozen ({100 * n / max(total, 1):.2f}%)")

    def tuned_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.params.items()}

    def teacher_memory(self) -> dict[str, int]:
        """The teacher keeps no weights at all (adapters off); a copy would be the whole model."""
        full = sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if ".lora_" not in n)
        return {"teacher_bytes": 0, "full_copy_bytes": full, "saved_bytes": full}

    def file_metadata(self) -> dict[str, str]:
        return lora_metadata(self.spec, self.base_dtype)

    # ---- the frozen teacher ----
    @contextlib.contextmanager
    def teacher(self) -> Iterator[nn.Module]:
        """The base model (adapters disabled, eval mode, no grad) inside the block."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.peft_model.disable_adapter(), torch.no_grad():
                yield self.model
        finally:
            self.model.train(was_training)


def lora_metadata(spec: LoRASpec, base_dtype: torch.dtype) -> dict[str, str]:
    import json
    return {"kind": "lora", "lora_rank": str(spec.rank), "lora_alpha": repr(spec.alpha), "lora_dropout": repr(spec.dropout),
            "lora_targets": json.dumps(list(spec.targets)), "base_dtype": str(base_dtype).removeprefix("torch.")}


def spec_from_metadata(metadata: Mapping[str, str]) -> tuple[LoRASpec, torch.dtype]:
    import json
    try:
        spec = LoRASpec(int(metadata["lora_rank"]), float(metadata["lora_alpha"]),
                        tuple(json.loads(metadata["lora_targets"])), float(metadata.get("lora_dropout", 0.0)))
        dtype = getattr(torch, metadata.get("base_dtype", "float32"))
    except (KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(f"LoRA personalization metadata incomplete or wrong: {type(e).__name__}: {e}") from e
    return spec, dtype


def inject_lora(model: nn.Module, spec: LoRASpec, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Put adapters `tensors` (our names) into `model` in place, frozen and enabled (for sampling)."""
    from peft import inject_adapter_in_model
    expected = {f"{t}.lora_{ab}.weight" for t in spec.targets for ab in "AB"}
    if set(tensors) != expected:
        diff = sorted(set(tensors) ^ expected)
        raise CheckpointError(f"LoRA tensors do not match the recorded layers: {diff[:4]}")
    inject_adapter_in_model(spec.peft_config(), model, adapter_name=ADAPTER)
    params = {_saved_name(n): p for n, p in model.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        for k, v in tensors.items():
            if params[k].shape != v.shape:
                raise CheckpointError(f"LoRA tensor {k}: {tuple(v.shape)} vs layer {tuple(params[k].shape)}")
            params[k].data = v.to(params[k].device, torch.float32).clone()
    model.requires_grad_(False)
    return model


def merged_weights(model: nn.Module, spec: LoRASpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{`<layer>.weight`: W + (alpha / r) B A} in fp32 for every adapted layer of the plain base `model`."""
    modules = dict(model.named_modules())
    out = {}
    for t in spec.targets:
        W = modules[t].weight.detach().float()
        A, B = tensors[f"{t}.lora_A.weight"].float(), tensors[f"{t}.lora_B.weight"].float()
        out[f"{t}.weight"] = W + spec.scaling * (B.to(W.device) @ A.to(W.device))
    return out

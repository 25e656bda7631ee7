"""Selective layer tuning for ARBooth, with a frozen teacher that costs only the tuned modules.

ARBooth trains the cross-attention and FFN of every block (plus <S*>); self-attention only in the
ablation (jiwoogit/ARBooth booth_train_final.py L294-305: enable_ca_layer, enable_ffn_layer,
enable_sa_layer, enable_all_layer). The authors keep a second full model as the prior-distillation
teacher (`gpt_ori = deepcopy(gpt)`, L417). Here the teacher is the same model with the ORIGINAL
values of the tuned tensors swapped in for the duration of a `with tuner.teacher():` block: only
the tuned modules are stored twice. The swap exchanges `Parameter.data` storages (no copy), so the
optimizer keeps seeing the same Parameter objects; it must not run inside the block, and no graph
that saved the student's weights may be alive across it (the recipe runs the teacher first).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from arbooth.errors import ConfigError

# Attribute names of the sub-layers of an Infinity block (arbooth.models.infinity.CrossAttnBlock).
SELF_ATTENTION, CROSS_ATTENTION, FFN = "sa", "ca", "ffn"


def tuned_module_kinds(self_attention: bool, cross_attention: bool, ffn: bool, all_layers: bool) -> tuple[str, ...]:
    """The block sub-layers to train; `all_layers` = all three, as the authors' enable_all_layer."""
    kinds = tuple(k for k, on in ((SELF_ATTENTION, self_attention or all_layers),
                                  (CROSS_ATTENTION, cross_attention or all_layers),
                                  (FFN, ffn or all_layers)) if on)
    if not kinds:
        raise ConfigError("selective tuning needs at least one of self_attention, cross_attention, ffn")
    return kinds


class SelectiveTuner:
    """Freezes `model` except the `kinds` sub-layers of every block in `model.blocks`, and keeps
    their original values for the teacher."""

    def __init__(self, model: nn.Module, kinds: Sequence[str] = (CROSS_ATTENTION, FFN)) -> None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ConfigError(f"{type(model).__name__} has no `blocks` list to tune")
        self.model, self.kinds = model, tuple(kinds)
        self.params: dict[str, nn.Parameter] = {}
        for i, block in enumerate(blocks):
            for kind in self.kinds:
                sub = getattr(block, kind, None)
                if not isinstance(sub, nn.Module):
                    raise ConfigError(f"block {i} has no sub-layer {kind!r} (pattern matches nothing)")
                for name, p in sub.named_parameters():
                    self.params[f"blocks.{i}.{kind}.{name}"] = p
        model.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        # The teacher's weights: the values before training (same dtype, so the swap is exact).
        self.originals = {k: p.detach().clone() for k, p in self.params.items()}
        self._swapped = False

    @functools.cached_property
    def base_tuned_sha256(self) -> str:
        """Hash of the original tuned tensors (the refusal on a wrong base). Computed on first use, so that
        benchmarks/memory.py can build the tuner on fake tensors, which have no bytes to hash."""
        if self._swapped:
            raise RuntimeError("base_tuned_sha256 read inside teacher(), where originals holds the student")
        return tensors_sha256(self.originals)

    # ---- what trains ----
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def summary(self) -> str:
        total = sum(p.numel() for p in self.model.parameters())
        n = self.num_trainable()
        return (f"training {'+'.join(self.kinds)} of {len(self.model.blocks)} blocks: {n:,} of {total:,} "
                f"parameters ({100 * n / max(total, 1):.1f}%)")

    def tuned_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.params.items()}

    # ---- how it trains and saves: what differs from LoRATuner, so the recipe never asks tuning.method ----
    lr_scale = 1.0  # the tuned weights train at optim.lr, as <S*>

    @property
    def trains_bf16(self) -> bool:
        """The tuned weights are bf16 (model.tuned_dtype=bf16): the optimizer rounds their updates
        stochastically (arbooth/optim.py) unless optim.stochastic_rounding is off."""
        return any(p.dtype == torch.bfloat16 for p in self.params.values())

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors the personalization file holds: the tuned weights as they train (their dtype)."""
        return self.tuned_state_dict()

    def file_metadata(self) -> dict[str, str]:
        return {"kind": "full"}

    def teacher_memory(self) -> dict[str, int]:
        """Bytes of the teacher's stored weights versus a full model copy (the authors' deepcopy)."""
        kept = sum(t.numel() * t.element_size() for t in self.originals.values())
        full = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"teacher_bytes": kept, "full_copy_bytes": full, "saved_bytes": full - kept}

    # ---- the frozen teacher ----
    @contextlib.contextmanager
    def teacher(self) -> Iterator[nn.Module]:
        """The base model (original tuned weights, eval mode, no grad) inside the block."""
        if self._swapped:
            raise RuntimeError("teacher() is not re-entrant")
        was_training = self.model.training
        self._swap()
        self.model.eval()
        try:
            with torch.no_grad():
                yield self.model
        finally:
            self._swap()
            self.model.train(was_training)

    @torch.no_grad()
    def _swap(self) -> None:
        for k, p in self.params.items():
            p.data, self.originals[k] = self.originals[k], p.data
        self._swapped = not self._swapped


def tuned_parameter_names(model: nn.Module, kinds: Sequence[str]) -> list[str]:
    """The state_dict names SelectiveTuner(model, kinds) trains (without cloning anything)."""
    return [f"blocks.{i}.{kind}.{n}" for i, block in enumerate(model.blocks) for kind in kinds
            for n, _ in getattr(block, kind).named_parameters()]


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes, in name order (checks a base model before applying)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

"""How both transformer families keep the frozen image tokenizer they decode with (VAR's VQVAE,
Infinity's BSQ-VAE): one convention, one place.

The tokenizer is reachable as `model.vae` but is deliberately not a registered submodule, so
`parameters()`, `state_dict()`, optimizers, peft and Opacus see only the transformer, exactly as in the
released checkpoints. Device and dtype moves (`.to()`, `.cuda()`, `.half()`, `.to_empty()`) reach it
too, so a model and its tokenizer never end up on different devices.
"""
from __future__ import annotations

from torch import nn


class TokenizerHolder(nn.Module):
    """Base class of VAR and Infinity: `attach_tokenizer(vae)` once in `__init__`, then `self.vae`."""

    vae: nn.Module

    def attach_tokenizer(self, vae: nn.Module) -> None:
        # object.__setattr__ bypasses nn.Module's registration of module attributes (see the module docstring)
        object.__setattr__(self, "vae", vae)

    def _apply(self, fn, recurse=True):  # the one hook every .to()/.cuda()/.half() goes through
        self.vae._apply(fn, recurse)
        return super()._apply(fn, recurse)

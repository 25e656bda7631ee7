"""The key/value cache of next-scale generation, shared by both model families (VAR and Infinity).

Shapes: B batch, H heads, L tokens cached so far, l tokens of the current scale, c head width.
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values (B, H, L, c) of the scales generated so far, for one attention layer. Owned by
    the sampler (`VAR.generate`, `Infinity.generate`: one per block); `extend` appends this scale's
    (B, H, l, c) along the token axis and returns the keys/values to attend to."""

    def __init__(self):
        self.k_BHLc: torch.Tensor | None = None
        self.v_BHLc: torch.Tensor | None = None

    def extend(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_BHLc is not None:
            k_BHlc, v_BHlc = torch.cat((self.k_BHLc, k_BHlc), dim=2), torch.cat((self.v_BHLc, v_BHlc), dim=2)
        self.k_BHLc, self.v_BHLc = k_BHlc, v_BHlc
        return k_BHlc, v_BHlc

"""Sampling from a personalized Infinity: the base model with a `Personalization` applied (tuned tensors
and <S*>). Prompts name the subject with the placeholder ("a <S*> dog wearing a santa hat").

`arbooth.subject_bases.load_sampler(path)` builds one from a personalization file (it rebuilds
the base model the file's training config records); `arbooth generate --personalization`,
`arbooth eval-subject --model` and `arbooth bench-subject` use it.
"""
from __future__ import annotations

import dataclasses

import torch
from PIL import Image
from torch import nn

from arbooth.adapt.personalization import Personalization
from arbooth.data.images import tensor_to_pil


@dataclasses.dataclass
class PersonalizedSampler:
    """A personalized Infinity ready to sample: `model` already has `personalization` applied."""

    model: nn.Module
    tokenizer: object
    encoder: nn.Module
    personalization: Personalization
    schedule: list[tuple[int, int, int]]
    device: torch.device
    guidance: float = 4.0             # default guidance scale (the run's val_cfg, else the preset's)
    tau: float = 0.5                  # default temperature (the run's val_tau)

    @property
    def class_noun(self) -> str:
        return self.personalization.metadata.get("class_noun", "")

    @torch.no_grad()
    def generate(self, prompts: list[str], *, seed: int | list[int] = 0, cfg: float | list[float] | None = None,
                 tau: float | list[float] | None = None, top_k: int = 900, top_p: float = 0.97,
                 dtype: str = "bf16", use_cache: bool = True, next_scale_mode: str = "trilinear") -> torch.Tensor:
        """(B, 3, H, W) in [0, 1]; guidance and temperature default to the run's validation settings.
        A list of seeds (one per prompt) samples every image from its own seed. `use_cache` and
        `next_scale_mode` as `Infinity.generate`."""
        text_BTC, mask_BT = self.personalization.encode(self.tokenizer, self.encoder, prompts,
                                                        max_length=self.model.text_maxlen, device=self.device)
        out = self.model.generate(text_BTC, mask_BT, self.schedule, cfg=self.guidance if cfg is None else cfg,
                                  tau=self.tau if tau is None else tau, top_k=top_k, top_p=top_p,
                                  seed=seed, dtype=dtype, use_cache=use_cache, next_scale_mode=next_scale_mode)
        return out.images

    def images(self, prompt: str, seeds: list[int]) -> list[Image.Image]:
        """One image of `prompt` per seed, sampled as one batch; image i depends on seeds[i] only
        (`arbooth eval-subject --model` batches with this)."""
        return [tensor_to_pil(x) for x in self.generate([prompt] * len(seeds), seed=list(seeds))]

    def __call__(self, prompt: str, seed: int) -> Image.Image:
        """The (prompt, seed) -> image contract of `arbooth eval-subject --model`."""
        return self.images(prompt, [seed])[0]

"""Sampling from a personalization file: rebuild the base model its config records, apply the tuned
tensors and <S*>, and generate. Used by `arbooth generate --personalization` and `arbooth eval-subject
--model`; prompts name the subject with the placeholder ("a <S*> dog wearing a santa hat")."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from arbooth.adapt.personalization import Personalization, load_personalization
from arbooth.config import from_dict
from arbooth.data.images import tensor_to_pil
from arbooth.errors import CheckpointError, ConfigError
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_subject import build_models, subject_schedule


@dataclasses.dataclass
class PersonalizedSampler:
    model: nn.Module
    tokenizer: object
    encoder: nn.Module
    personalization: Personalization
    schedule: list[tuple[int, int, int]]
    config: SubjectTrainConfig
    device: torch.device

    @classmethod
    def from_file(cls, path: str | Path, *, model_ckpt: str | None = None, vae_ckpt: str | None = None,
                  t5: str | None = None, device: str | torch.device = "cpu") -> PersonalizedSampler:
        """Load `path`; the base checkpoints default to those recorded at training time."""
        pers = load_personalization(path)
        try:
            cfg = from_dict(SubjectTrainConfig, pers.config)
        except ConfigError as e:
            raise CheckpointError(f"{path}: its recorded training config does not load: {e}") from e
        m = cfg.model
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            m, model_ckpt=model_ckpt or m.model_ckpt, vae_ckpt=vae_ckpt or m.vae_ckpt, t5=t5 or m.t5,
            drop_path_rate=0.0))
        _, model, tokenizer, encoder, _ = build_models(cfg)
        pers.apply(model)  # checks that this is the base model it was trained from
        device = torch.device(device)
        return cls(model.to(device).eval(), tokenizer, encoder.to(device), pers, subject_schedule(cfg), cfg, device)

    @property
    def class_noun(self) -> str:
        return self.personalization.metadata.get("class_noun", "")

    @torch.no_grad()
    def generate(self, prompts: list[str], *, seed: int | list[int] = 0, cfg: float | list[float] | None = None,
                 tau: float | list[float] | None = None, top_k: int = 900, top_p: float = 0.97,
                 dtype: str = "bf16") -> torch.Tensor:
        """(B, 3, H, W) in [0, 1]; guidance and temperature default to the run's validation settings.
        A list of seeds (one per prompt) samples every image from its own seed."""
        text_BTC, mask_BT = self.personalization.encode(self.tokenizer, self.encoder, prompts,
                                                        max_length=self.model.text_maxlen, device=self.device)
        out = self.model.generate(text_BTC, mask_BT, self.schedule, cfg=self.config.val_cfg if cfg is None else cfg,
                                  tau=self.config.val_tau if tau is None else tau, top_k=top_k, top_p=top_p,
                                  seed=seed, dtype=dtype)
        return out.images

    def images(self, prompt: str, seeds: list[int]) -> list[Image.Image]:
        """One image of `prompt` per seed, sampled as one batch; image i depends on seeds[i] only
        (`arbooth eval-subject --model` batches with this)."""
        return [tensor_to_pil(x) for x in self.generate([prompt] * len(seeds), seed=list(seeds))]

    def __call__(self, prompt: str, seed: int) -> Image.Image:
        """The (prompt, seed) -> image contract of `arbooth eval-subject --model`."""
        return self.images(prompt, [seed])[0]

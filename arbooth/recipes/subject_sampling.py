"""Sampling from a personalization file: rebuild the base model its config records, apply the tuned
tensors (or inject the LoRA adapters) and <S*>, and generate. Used by `arbooth generate --personalization` and `arbooth eval-subject
--model`; prompts name the subject with the placeholder ("a <S*> dog wearing a santa hat")."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from arbooth.adapt.personalization import (
    Personalization,
    load_personalization,
    merge_lora_personalization,
    save_personalization,
)
from arbooth.config import from_dict
from arbooth.data.images import tensor_to_pil
from arbooth.errors import CheckpointError, ConfigError
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_subject import build_models, subject_schedule


def build_base(pers: Personalization, path: str | Path, *, model_ckpt: str | None = None, vae_ckpt: str | None = None,
               t5: str | None = None) -> tuple[SubjectTrainConfig, nn.Module, object, nn.Module]:
    """(config, base model, tokenizer, T5 encoder) the personalization was trained on (CPU, fp32, eval)."""
    try:
        cfg = from_dict(SubjectTrainConfig, pers.config)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its recorded training config does not load: {e}") from e
    m = cfg.model
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        m, model_ckpt=model_ckpt or m.model_ckpt, vae_ckpt=vae_ckpt or m.vae_ckpt, t5=t5 or m.t5,
        drop_path_rate=0.0))
    _, model, tokenizer, encoder, _ = build_models(cfg)
    return cfg, model, tokenizer, encoder


def export_merged_personalization(path: str | Path, out: str | Path, *, model_ckpt: str | None = None,
                                  vae_ckpt: str | None = None, t5: str | None = None,
                                  dtype: str | None = None) -> Path:
    """`arbooth export PERSONALIZATION --merge`: a LoRA personalization file -> a full one (the tuned
    tensors of every adapted sub-layer with the adapters merged in, the authors' kind of result), which
    `generate --personalization` and `eval-subject --model` take like any full file. `dtype`: "bf16" or
    "fp32" (default: the dtype the blocks had in training)."""
    pers = load_personalization(path)
    _, model, _, _ = build_base(pers, path, model_ckpt=model_ckpt, vae_ckpt=vae_ckpt, t5=t5)
    dt = {None: None, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    merged = merge_lora_personalization(pers, model, dtype=dt)
    meta = {k: v for k, v in merged.metadata.items() if k not in ("format", "base_tuned_sha256")}
    return save_personalization(out, merged.tensors, merged.subject_token_PC,
                                base_tuned_sha256=merged.metadata["base_tuned_sha256"], metadata=meta)


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
        """Load `path` (a full or a LoRA personalization); the base checkpoints default to those recorded
        at training time."""
        pers = load_personalization(path)
        cfg, model, tokenizer, encoder = build_base(pers, path, model_ckpt=model_ckpt, vae_ckpt=vae_ckpt, t5=t5)
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

"""Base text-to-image models for subject personalization, and loading a personalization for inference.

The one owner of what `model.preset` names (SUBJECT_PRESETS, a plain dict as DiT's `DiT_models`) and of
everything that rebuilds a personalized model from a file: `generate --personalization`, `eval-subject
--model`, `export --merge`, the benchmark and the training recipe all reach base models through this
module, so inference never imports a training loop (README "Layout"; an import-linter contract in
pyproject.toml). Layer: above `toy` (whose shipped base and tiny random base are presets here), below
`recipes`.

`ModelConfig` (the `model:` section of a subject config) lives here too, since a personalization file
records it and inference must read it back without the training recipe's other settings.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from arbooth.adapt.personalization import (
    Personalization,
    load_personalization,
    merge_lora_personalization,
    personalization_root,
    save_personalization,
)
from arbooth.adapt.personalized_sampler import PersonalizedSampler
from arbooth.config import from_dict
from arbooth.errors import CheckpointError, ConfigError
from arbooth.model_card import recorded_path
from arbooth.models.infinity_loading import (
    infinity_2b_base,
    infinity_8b_512_base,
    infinity_8b_512_schedule,
    infinity_8b_base,
)
from arbooth.models.infinity_schedule import infinity_scale_schedule
from arbooth.toy.models import toy_infinity_base, toy_schedule
from arbooth.toy.report import toy_run_report
from arbooth.toy.tiny import tiny_infinity_base


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "infinity_2b"          # a key of SUBJECT_PRESETS: infinity_2b, infinity_8b (1024x1024),
    #   infinity_8b_512, tiny (random weights, no checkpoint; tests, CPU), toy (the pretrained toy base shipped
    #   in arbooth/assets/toy, docs/toy.md)
    model_ckpt: str | None = None       # infinity_2b_reg.pth / the sharded infinity_8b_weights folder (toy: the
    #   toy base folder; default the shipped one)
    vae_ckpt: str | None = None         # infinity_vae_d32_reg.pth / infinity_vae_d56_f8_14_patchify.pth
    t5: str | None = None               # flan-t5-xl folder
    # released presets: constructor arguments over the release's sizes (INFINITY_PRESETS), for a checkpoint of
    # the release's family at other sizes (as `generate --model-kwargs / --vae-kwargs`); null = the release
    model_kwargs: dict | None = None
    vae_kwargs: dict | None = None
    pn: str = "1M"                      # scale-schedule size: 1M = 1024x1024, 13 scales (authors' training)
    h_div_w: float = 1.0
    lvl_embed_every_chunk: bool = False  # the ARBooth fork's level-embedding quirk (notes 12)
    drop_path_rate: float = 0.1          # the student trains in train mode with DropPath, as the authors
    cond_drop_rate: float = 0.1          # ... and 10% prompt drop to cfg_uncond
    tuned_dtype: Literal["fp32", "bf16"] = "bf16"  # blocks in bf16 as the authors (fits 24 GB); fp32 = exact updates
    seed: int = 0                        # tiny preset: seed of the random weights

    def __post_init__(self) -> None:
        if self.preset not in SUBJECT_PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; one of {', '.join(SUBJECT_PRESETS)}")
        for name in ("model_kwargs", "vae_kwargs"):
            kw = getattr(self, name)
            if kw is not None and (not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw)):
                raise ConfigError(f"model.{name} must be a mapping of constructor arguments, got {kw!r}")


def released_schedule(model_cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """The released scale schedule for `model.h_div_w` and `model.pn` (infinity/utils/dynamic_resolution.py)."""
    return [tuple(s) for s in infinity_scale_schedule(model_cfg.h_div_w, model_cfg.pn)]


@dataclass(frozen=True)
class SubjectPreset:
    """What `model.preset` names. `build(model_cfg, model_kwargs)` -> (vae, model, tokenizer,
    t5_encoder, base_id), frozen, eval mode, on the CPU; `schedule(model_cfg)` -> the scale schedule,
    known before any weights load; `report(cfg, personalization_path)` -> lines `train-subject`
    prints after training (None: no report); `num_threads`: torch threads `train-subject` uses (None:
    torch's default); `guidance`: the default classifier-free guidance scale for sampling from this base
    (validation grids, `generate`, `eval-subject`; the release's `cfg`), `tau` its default temperature."""

    build: Callable[[ModelConfig, dict], tuple]
    schedule: Callable[[ModelConfig], list[tuple[int, int, int]]]
    report: Callable[..., list[str]] | None = None
    num_threads: int | None = None
    guidance: float = 4.0     # Infinity's released inference default (tools/run_infinity.py cfg=4)
    tau: float = 0.5          # ... and tau=0.5


SUBJECT_PRESETS: dict[str, SubjectPreset] = {
    "infinity_2b": SubjectPreset(infinity_2b_base, released_schedule),
    # Infinity-8B (arbooth/models/infinity.py INFINITY_PRESETS; configs/subject/infinity_8b.yaml)
    "infinity_8b": SubjectPreset(infinity_8b_base, released_schedule),
    "infinity_8b_512": SubjectPreset(infinity_8b_512_base, infinity_8b_512_schedule),
    "tiny": SubjectPreset(tiny_infinity_base, released_schedule),
    # the toy model's ops are tiny: one thread is as fast on an idle machine and ~5x faster on a busy one;
    # guidance 6: the toy base draws the asked class in 96% of samples at cfg 6 vs 93% at 4 (docs/toy.md)
    "toy": SubjectPreset(toy_infinity_base, toy_schedule, report=toy_run_report, num_threads=1, guidance=6.0),
}


def preset_schedule(model_cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """The scale schedule `model_cfg` trains and samples at, from its preset (no weights read)."""
    return SUBJECT_PRESETS[model_cfg.preset].schedule(model_cfg)


def build_models(model_cfg: ModelConfig, *, gradient_checkpointing: bool = False) -> tuple:
    """(vae, model, tokenizer, t5_encoder, base_id) of `model_cfg.preset`, on the CPU; frozen, eval mode.
    Raises ConfigError / CheckpointError (from the preset's builder) for missing paths or files."""
    kw = {"drop_path_rate": model_cfg.drop_path_rate, "lvl_embed_every_chunk": model_cfg.lvl_embed_every_chunk,
          "gradient_checkpointing": gradient_checkpointing}
    return SUBJECT_PRESETS[model_cfg.preset].build(model_cfg, kw)


@dataclass(frozen=True)
class PersonalizedBase:
    """The base a personalization file was trained on, rebuilt for inference (CPU, eval mode, no drop path)."""

    model_cfg: ModelConfig
    schedule: list[tuple[int, int, int]]
    model: torch.nn.Module
    tokenizer: object
    encoder: torch.nn.Module
    guidance: float           # the run's validation guidance scale (default for sampling)
    tau: float


def build_base(pers: Personalization, path: str | Path, *, model_ckpt: str | None = None,
               vae_ckpt: str | None = None, t5: str | None = None) -> PersonalizedBase:
    """The base model the personalization `pers` (read from `path`) was trained on; the checkpoints default to
    those recorded at training time. Raises CheckpointError when the recorded config does not load."""
    recorded = pers.config
    try:
        m = from_dict(ModelConfig, recorded.get("model", {}), "model.")
        schedule = preset_schedule(m)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its recorded training config does not load: {e}") from e
    preset = SUBJECT_PRESETS[m.preset]
    # val_cfg / val_tau: the run's validation settings (None or absent in older files: the preset's)
    guidance = recorded.get("val_cfg")
    tau = recorded.get("val_tau")
    # the file records names only (model_card.shareable); the run folder's config.yaml beside it has the paths
    root = personalization_root(path)
    local = [root.parent / "config.yaml"]  # a LoRA folder or a full file sits in its run folder
    m = dataclasses.replace(m, model_ckpt=model_ckpt or recorded_path(m.model_ckpt, "model.model_ckpt", local),
                            vae_ckpt=vae_ckpt or recorded_path(m.vae_ckpt, "model.vae_ckpt", local),
                            t5=t5 or recorded_path(m.t5, "model.t5", local), drop_path_rate=0.0)
    _, model, tokenizer, encoder, _ = build_models(m)
    return PersonalizedBase(m, schedule, model, tokenizer, encoder,
                            preset.guidance if guidance is None else float(guidance),
                            preset.tau if tau is None else float(tau))


def load_sampler(path: str | Path, *, model_ckpt: str | None = None, vae_ckpt: str | None = None,
                 t5: str | None = None, device: str | torch.device = "cpu") -> PersonalizedSampler:
    """A `PersonalizedSampler` from a personalization file written by the subject recipe (full or LoRA): the
    base model its recorded config names is rebuilt (the checkpoints default to those recorded at training
    time) and the personalization applied (tuned tensors copied in, or LoRA adapters injected), which checks
    that it is the base model it was trained from.
    Raises CheckpointError for a missing or foreign file or a recorded config that does not load."""
    pers = load_personalization(path)
    base = build_base(pers, path, model_ckpt=model_ckpt, vae_ckpt=vae_ckpt, t5=t5)
    pers.apply(base.model)
    device = torch.device(device)
    return PersonalizedSampler(base.model.to(device).eval(), base.tokenizer, base.encoder.to(device), pers,
                               base.schedule, device, guidance=base.guidance, tau=base.tau)


def export_merged_personalization(path: str | Path, out: str | Path, *, model_ckpt: str | None = None,
                                  vae_ckpt: str | None = None, t5: str | None = None,
                                  dtype: str | None = None) -> Path:
    """`arbooth export PERSONALIZATION --merge`: a LoRA personalization file -> a full one (the tuned
    tensors of every adapted sub-layer with the adapters merged in, the authors' kind of result), which
    `generate --personalization` and `eval-subject --model` take like any full file. `dtype`: "bf16" or
    "fp32" (default: the dtype the blocks had in training)."""
    pers = load_personalization(path)
    model = build_base(pers, path, model_ckpt=model_ckpt, vae_ckpt=vae_ckpt, t5=t5).model
    dt = {None: None, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    merged = merge_lora_personalization(pers, model, dtype=dt)
    meta = {k: v for k, v in merged.metadata.items() if k not in ("format", "base_tuned_sha256")}
    return save_personalization(out, merged.tensors, merged.subject_token_PC,
                                base_tuned_sha256=merged.metadata["base_tuned_sha256"], metadata=meta)

"""Config of the ARBooth subject-personalization recipe (configs/subject/*.yaml).

Defaults are the authors' (jiwoogit/ARBooth arg_util.py, booth_train_final.py; see
../shared/golden/infinity/ARBOOTH_NOTES.md), except where docs/arbooth.md says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from arbooth.adapt.arbooth_losses import default_scale_weights


@dataclass(frozen=True)
class ModelConfig:
    preset: Literal["infinity_2b", "tiny", "toy"] = "infinity_2b"  # tiny: random weights, no checkpoint (tests,
    #   CPU); toy: the pretrained toy base shipped in arbooth/assets/toy (configs/subject/toy.yaml, docs/toy.md)
    model_ckpt: str | None = None       # infinity_2b_reg.pth (toy: the toy base folder; default the shipped one)
    vae_ckpt: str | None = None         # infinity_vae_d32_reg.pth
    t5: str | None = None               # flan-t5-xl folder
    pn: str = "1M"                      # scale-schedule size: 1M = 1024x1024, 13 scales (authors' training)
    h_div_w: float = 1.0
    lvl_embed_every_chunk: bool = False  # the ARBooth fork's level-embedding quirk (notes 12)
    drop_path_rate: float = 0.1          # the student trains in train mode with DropPath, as the authors
    cond_drop_rate: float = 0.1          # ... and 10% prompt drop to cfg_uncond
    tuned_dtype: Literal["fp32", "bf16"] = "bf16"  # blocks in bf16 as the authors (fits 24 GB); fp32 = exact updates
    seed: int = 0                        # tiny preset: seed of the random weights


@dataclass(frozen=True)
class PromptConfig:
    placeholder: str = "<S*>"
    instance_template: str = "a photo of {token} {cls}"   # arg_util.py L522
    class_template: str = "a photo of {cls}"              # arg_util.py L523
    validation: tuple[str, ...] = ("a {} in the jungle", "a {} on the beach", "a {} wearing a santa hat")


@dataclass(frozen=True)
class TuningConfig:
    cross_attention: bool = True
    ffn: bool = True
    self_attention: bool = False
    all_layers: bool = False
    text_prefix_length: int = 4                          # rows of <S*>
    token_init: Literal["zeros", "class_noun"] = "zeros"  # zeros = authors

    def __post_init__(self) -> None:
        if self.text_prefix_length < 1:
            raise ValueError("text_prefix_length must be >= 1")


@dataclass(frozen=True)
class LossConfig:
    scale_weights: tuple[float, ...] | None = None  # None: 1.0 for the first 8 scales, 0.5 after
    prior: bool = True                               # prior distillation on/off (with_reg)
    reg_lambda: float = 0.5
    distill_type: Literal["soft", "hard"] = "soft"
    distill_temperature: float = 1.0
    distill_softmax: Literal["token", "bit"] = "token"  # token = authors (one softmax over 2d logits)

    def weights_for(self, num_scales: int) -> tuple[float, ...]:
        w = self.scale_weights if self.scale_weights is not None else default_scale_weights(num_scales)
        if len(w) < num_scales:
            raise ValueError(f"loss.scale_weights has {len(w)} entries for {num_scales} scales")
        return tuple(w[:num_scales])

    def __post_init__(self) -> None:
        if self.reg_lambda < 0 or self.distill_temperature <= 0:
            raise ValueError("reg_lambda must be >= 0 and distill_temperature > 0")


@dataclass(frozen=True)
class BSCConfig:
    """Bitwise self-correction of the instance inputs (arbooth/models/bitwise_self_correction.py)."""

    strength: float = 0.3    # largest per-scale flip rate, rates 0, 0.01, ... (noise_apply_strength); 0 = clean
    apply_layers: int = 13   # flips on the first N scales (noise_apply_layers; 13 = all of the 1M schedule)
    requant: bool = True     # re-quantise later inputs/labels after the flips (noise_apply_requant); off = no-op

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0 or self.apply_layers < 0:
            raise ValueError("bsc.strength must be in [0, 1] and bsc.apply_layers >= 0")


@dataclass(frozen=True)
class TeacherConfig:
    mode: Literal["proper", "arbooth_compat"] = "proper"  # proper: KV-cached sampler; see docs/arbooth.md
    tau: float = 0.5
    top_k: int = 900
    top_p: float = 0.97


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2.34375e-5     # tblr 6e-3 * bs 1 / 256
    weight_decay: float = 0.005
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    step_mode: Literal["two_steps", "combined"] = "two_steps"  # authors: one AdamW step per loss
    grad_clip: float = 0.0     # 0: none, as the authors
    # bf16 tuned weights: round updates stochastically (arbooth/optim.py) so the small ones are not lost;
    # false = plain torch AdamW on bf16 weights, as the authors (most lr=2.3e-5 updates round away)
    stochastic_rounding: bool = True


@dataclass(frozen=True)
class SubjectTrainConfig:
    subject: str = ""
    class_noun: str = ""               # empty: from subject.yaml
    out_dir: str = "runs/subject"
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    bsc: BSCConfig = field(default_factory=BSCConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 500
    batch_size: int = 2
    seed: int = 0
    dtype: Literal["bf16", "fp32"] = "bf16"   # autocast (a no-op on the CPU)
    gradient_checkpointing: bool = True
    device: str = "auto"
    validate_every: int = 100          # 0: never; PNG grids of prompts.validation
    val_cfg: float = 4.0
    val_tau: float = 0.5
    save_every: int = 100              # resumable training state; 0: only at the end
    resume: bool = False               # continue the run in out_dir (same config up to train_subject.SAFE_RESUME_KEYS)
    overwrite: bool = False            # out_dir holds another run: delete its outputs and start anew

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")
        if self.validate_every < 0 or self.save_every < 0:
            raise ValueError("validate_every and save_every must be >= 0")

"""Config of the ARBooth subject-personalization recipe (configs/subject/*.yaml).

Defaults are the authors' (jiwoogit/ARBooth arg_util.py, booth_train_final.py; see
../shared/golden/infinity/ARBOOTH_NOTES.md), except where docs/arbooth.md says otherwise.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal

from arbooth.adapt.arbooth_losses import default_scale_weights
from arbooth.errors import ConfigError
from arbooth.models.sampling import check_sampling_args
from arbooth.subject_bases import SUBJECT_PRESETS, ModelConfig  # noqa: F401 (the model section; re-exported)
from arbooth.tracking import trackers


@dataclass(frozen=True)
class PromptConfig:
    placeholder: str = "<S*>"
    instance_template: str = "a photo of {token} {cls}"   # arg_util.py L522; must hold {token} and {cls}
    class_template: str = "a photo of {cls}"              # arg_util.py L523; must hold {cls}, not {token}
    validation: tuple[str, ...] = ("a {} in the jungle", "a {} on the beach", "a {} wearing a santa hat")
    #   each with one `{}` for the subject phrase ("<S*> dog")

    def __post_init__(self) -> None:
        # Checked when the config loads, before any model: a template without {token} trains <S*> never
        # (the subject goes into the class prompt the prior loss protects), a misspelt field ({tok}) failed
        # with a KeyError after the models loaded. The one <S*> token is what training splices, what the
        # personalization file records and what prompts at sampling time must contain.
        p = self.placeholder
        if not p or any(c.isspace() for c in p) or any(c in p for c in "{}"):
            raise ConfigError(f"prompts.placeholder must be one word without braces, got {p!r}")
        _check_template("prompts.instance_template", self.instance_template, required={"token", "cls"})
        _check_template("prompts.class_template", self.class_template, required={"cls"}, allowed={"cls"})
        if p in self.class_template:
            raise ConfigError(f"prompts.class_template must contain {{cls}} and no placeholder, got {self.class_template!r}")
        for i, v in enumerate(self.validation):
            _check_template(f"prompts.validation[{i}]", v, required={""})
            if v.count("{}") != 1 or p in v:
                raise ConfigError(f"prompts.validation: each prompt needs exactly one {{}} (where '{p} <class>' "
                                  f"goes) and no literal placeholder; bad: {v!r}")


def _check_template(name: str, template: str, *, required: set[str], allowed: set[str] | None = None) -> None:
    """ConfigError unless `template` is a format string whose fields are exactly `required` (each once
    or more) within `allowed` (default: `required`); "" is the positional `{}`."""
    allowed = required if allowed is None else allowed
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{name}: {template!r} is not a valid template ({e})") from None
    show = {f: "{" + f + "}" for f in (*required, *allowed, *fields)}
    unknown = [show[f] for f in fields if f not in allowed]
    if unknown:
        raise ConfigError(f"{name}: {template!r} has unknown field(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(show[f] for f in allowed))}")
    missing = [show[f] for f in sorted(required) if f not in fields]
    if missing:
        raise ConfigError(f"{name}: {template!r} must contain {' and '.join(missing)}")


@dataclass(frozen=True)
class TuningConfig:
    # full: every weight of the chosen sub-layers trains (the authors); lora: peft LoRA adapters on their
    # linear layers (arbooth/adapt/subject_lora.py), base frozen, teacher = adapters disabled
    method: Literal["full", "lora"] = "full"
    cross_attention: bool = True
    ffn: bool = True
    self_attention: bool = False
    all_layers: bool = False
    text_prefix_length: int = 4                          # rows of <S*>
    token_init: Literal["zeros", "class_noun"] = "zeros"  # zeros = authors
    lora_rank: int = 16
    # None: 2 * lora_rank (scaling alpha/r = 2, as the class-conditional LoRA's r=16 alpha=32), so the
    # size of an update does not change with the rank (docs/arbooth.md "LoRA")
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_init: Literal["default", "gaussian"] = "default"  # peft's; both start at B = 0 (= the base model)
    # the lr of the adapters, as a multiple of optim.lr (<S*> keeps optim.lr): B starts at zero and the
    # update is low-rank, so LoRA needs larger steps than full tuning; 10 (2B: 2.3e-4, near the usual
    # LoRA-DreamBooth 1e-4) moved the toy subject where 1 barely did (docs/toy.md, "LoRA")
    lora_lr_scale: float = 10.0
    # dtype of the adapters in the personalization file (they train in fp32; train_state.pt keeps fp32):
    # bf16 halves the file (rank 16 at 2B: 37.8 MB instead of 75.6 MB); its rounding (2^-9 relative)
    # is that of the bf16 base weights the adapters are added to
    lora_file_dtype: Literal["bf16", "fp32"] = "bf16"

    def __post_init__(self) -> None:
        if self.text_prefix_length < 1:
            raise ConfigError("tuning.text_prefix_length must be >= 1")
        if self.lora_rank < 1 or not 0 <= self.lora_dropout < 1 or self.lora_lr_scale <= 0:
            raise ConfigError("tuning.lora_rank must be >= 1, lora_dropout in [0, 1), lora_lr_scale > 0")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError("tuning.lora_alpha must be > 0 (or null for 2 * lora_rank)")


@dataclass(frozen=True)
class LossConfig:
    scale_weights: tuple[float, ...] | None = None  # None: 1.0 for the first 8 scales, 0.5 after
    prior: bool = True                               # prior distillation on/off (with_reg)
    reg_lambda: float = 0.5
    distill_type: Literal["soft", "hard"] = "soft"
    distill_temperature: float = 1.0
    distill_softmax: Literal["token", "bit"] = "token"  # token = authors (one softmax over 2d logits)

    def weights_for(self, num_scales: int) -> tuple[float, ...]:
        """One weight per scale of a `num_scales` schedule. Raises ConfigError unless `loss.scale_weights`
        has exactly that many entries (none are cut off or repeated)."""
        if self.scale_weights is None:
            return default_scale_weights(num_scales)
        if len(self.scale_weights) != num_scales:
            raise ConfigError(f"loss.scale_weights has {len(self.scale_weights)} entries but the scale schedule "
                              f"has {num_scales} scales: give one weight per scale")
        return tuple(self.scale_weights)

    def __post_init__(self) -> None:
        if self.reg_lambda < 0 or self.distill_temperature <= 0:
            raise ConfigError("loss.reg_lambda must be >= 0 and loss.distill_temperature > 0")
        if self.scale_weights is not None and (not self.scale_weights or min(self.scale_weights) < 0):
            raise ConfigError("loss.scale_weights must be non-negative, one per scale (or null for the default)")


@dataclass(frozen=True)
class BSCConfig:
    """Bitwise self-correction of the instance inputs (arbooth/models/bitwise_self_correction.py)."""

    strength: float = 0.3    # largest per-scale flip rate, rates 0, 0.01, ... (noise_apply_strength); 0 = clean
    apply_layers: int = 13   # flips on the first N scales (noise_apply_layers; 13 = all of the 1M schedule)
    requant: bool = True     # re-quantise later inputs/labels after the flips (noise_apply_requant); off = no-op

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0 or self.apply_layers < 0:
            raise ConfigError("bsc.strength must be in [0, 1] and bsc.apply_layers >= 0")


@dataclass(frozen=True)
class TeacherConfig:
    mode: Literal["proper", "arbooth_compat"] = "proper"  # proper: KV-cached sampler; see docs/arbooth.md
    tau: float = 0.5
    top_k: int = 900
    top_p: float = 0.97
    # 0: sample the class prompt afresh every step (the authors). N > 0: draw N class samples and the
    # teacher's logits on them once at the start and reuse them (batches drawn from the bank): the
    # teacher then costs N / batch_size sampling passes in all instead of one per step
    bank_size: int = 0

    def __post_init__(self) -> None:
        if self.bank_size < 0:
            raise ConfigError("teacher.bank_size must be >= 0")
        check_sampling_args(top_k=self.top_k, top_p=self.top_p, tau=self.tau, where="teacher")


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
class LogConfig:
    """What every trainer logs where (the class recipes' `log` section has these keys too)."""

    every: int = 1                     # steps between console lines (metrics.jsonl and trackers: every step)
    report_to: str = "none"            # none | tensorboard | wandb | all (accelerate's trackers, arbooth/tracking.py)

    def __post_init__(self) -> None:
        trackers(self.report_to)
        if self.every < 1:
            raise ConfigError("log.every must be >= 1")


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
    log: LogConfig = field(default_factory=LogConfig)
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
            raise ConfigError("steps must be >= 0 and batch_size >= 1")
        if self.validate_every < 0 or self.save_every < 0:
            raise ConfigError("validate_every and save_every must be >= 0")
        check_sampling_args(cfg=self.val_cfg, tau=self.val_tau, where="val_cfg/val_tau")

"""Config of the class-conditional fine-tuning recipe (`arbooth train-class`).

Six sections: model (which VAR, from which checkpoints), data (where the images are, augmentation),
method (fft / lora / lora_attn / lora_mlp / lntuning), optim (AdamW, schedule, loss options), train
(length, batch, precision, checkpoints) and log. Every field is documented once, here; values derived
from several fields are properties and are never written back into the config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

# The model and method sections are defined beside the code that reads them (the result loader in
# arbooth/adapt reads them without this recipe config); their fields are documented there.
from arbooth.adapt.finetuned import ModelConfig
from arbooth.adapt.methods import MethodConfig
from arbooth.errors import ConfigError
from arbooth.models.sampling import check_sampling_args
from arbooth.tracking import trackers

__all__ = ["ClassTrainConfig", "DataConfig", "LogConfig", "MethodConfig", "ModelConfig", "OptimConfig",
           "TrainConfig"]

# Config keys a resume of a class run may change (`runs.check_resume`, recorded in run.json): more or
# fewer steps (a decaying lr schedule is rebuilt over the new total from the resumed step), checkpoint and
# log cadence, loader workers, and paths, whose content is checked by the data and base hashes instead.
# Anything else is refused. The DP recipe derives its set from this one (class_dp_config).
STEP_BUDGET_KEYS = ("train.max_steps", "train.epochs")
SAFE_RESUME_KEYS = (*STEP_BUDGET_KEYS, "train.checkpoint_every", "train.keep_checkpoints", "train.out_dir",
                    "log.", "data.num_workers", "data.root", "data.manifest", "model.vae_ckpt", "model.var_ckpt")

@dataclass(frozen=True)
class DataConfig:
    root: str | None = None               # image folder root/<class>/*.jpg (or root/<split>/<class>/...)
    manifest: str | None = None           # CSV or JSONL of path,label (paths relative to the manifest)
    split: str = "train"                  # used when root has a <split>/ subfolder
    image_size: int = 256                 # final crop; must equal model.image_size (16 * last patch_num)
    mid_reso: float = 1.125               # resize the short side to mid_reso * image_size, then crop
    random_crop: bool = True              # VAR's train augmentation; False = centre crop
    hflip: bool = False                   # the paper's configs keep flips off (authors' var_16.yaml)
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.mid_reso < 1.0:
            raise ConfigError(f"data.mid_reso must be >= 1, got {self.mid_reso}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.05            # not applied to biases, norms, embeddings (VAR's filter_params)
    betas: tuple[float, float] = (0.9, 0.95)  # VAR's AdamW betas (FoundationVision/VAR train.py)
    eps: float = 1e-8
    grad_clip: float = 0.1                # max global grad norm; 0 = off
    scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0                 # optimizer steps of linear warm-up
    label_smoothing: float = 0.0
    class_dropout: float = 0.1            # labels replaced by the "unconditional" class, for CFG

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("optim: lr must be > 0; weight_decay, grad_clip, warmup_steps >= 0")
        if not 0.0 <= self.class_dropout < 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("optim.class_dropout and optim.label_smoothing must lie in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 50.0                  # passes over the data; fractional allowed
    max_steps: int | None = None          # optimizer steps; overrides epochs when set
    batch_size: int = 32                  # per process (device) and micro-step
    # The logical batch of one optimizer step over all processes (the paper's "batch size"). Gradient
    # accumulation is derived from it: global_batch_size / (batch_size x processes), so 1 and 8 GPUs
    # take the same optimizer steps. Leave grad_accum unset when this is set.
    global_batch_size: int | None = None
    grad_accum: int | None = None         # explicit micro-steps per optimizer step (None = 1); only
    #                                       without global_batch_size (the logical batch then grows with GPUs)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: int = 0
    out_dir: str = "runs/train_class"
    checkpoint_every: int = 0             # optimizer steps between checkpoints; 0 = only the final one
    keep_checkpoints: int = 2             # older step checkpoints are deleted

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.grad_accum is not None and self.grad_accum < 1) or self.epochs <= 0:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1, train.epochs > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("train.max_steps must be >= 1")
        if self.global_batch_size is not None:
            if self.grad_accum is not None:
                raise ConfigError("set train.global_batch_size or train.grad_accum, not both: the "
                                  "accumulation is derived from the global batch")
            if self.global_batch_size < 1 or self.global_batch_size % self.batch_size:
                raise ConfigError(f"train.global_batch_size {self.global_batch_size} must be a positive "
                                  f"multiple of train.batch_size {self.batch_size}")

    def accum_steps(self, num_processes: int = 1) -> int:
        """Micro-steps per optimizer step for `num_processes` data-parallel processes.
        Raises ConfigError when global_batch_size is not batch_size x num_processes x an integer."""
        if self.global_batch_size is None:
            return self.grad_accum or 1
        per_step = self.batch_size * num_processes
        if self.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size {self.global_batch_size} is not a multiple of "
                              f"train.batch_size {self.batch_size} x {num_processes} process(es); "
                              f"choose a per-device batch that divides {self.global_batch_size // num_processes}")
        return self.global_batch_size // per_step

    def logical_batch(self, num_processes: int = 1) -> int:
        """Examples per optimizer step over all processes."""
        return self.batch_size * num_processes * self.accum_steps(num_processes)


@dataclass(frozen=True)
class LogConfig:
    every: int = 10                       # optimizer steps between console/tracker lines (and metrics.jsonl rows)
    report_to: str = "none"               # none | tensorboard | wandb | all (accelerate's trackers, arbooth/tracking.py)
    sample_every: int = 0                 # optimizer steps between sample grids; 0 = off
    sample_classes: tuple[int, ...] = (0, 1, 2, 3)
    sample_per_class: int = 2
    sample_cfg: float = 1.5               # >= 0
    sample_top_k: int = 900               # >= 0, 0 = off
    sample_top_p: float = 0.96            # in [0, 1], 0 = off

    def __post_init__(self) -> None:
        check_sampling_args(top_k=self.sample_top_k, top_p=self.sample_top_p, cfg=self.sample_cfg, where="log")
        trackers(self.report_to)
        if self.every < 1 or self.sample_every < 0:
            raise ConfigError("log.every must be >= 1 and log.sample_every >= 0")


@dataclass(frozen=True)
class ClassTrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.data.image_size != self.model.image_size:
            raise ConfigError(f"data.image_size {self.data.image_size} must equal the tokenizer's "
                              f"last patch_num x down-sampling = {self.model.image_size}")

    @property
    def mid_size(self) -> int:
        return round(self.data.mid_reso * self.data.image_size)

    def total_steps(self, micro_batches_per_epoch: int, num_processes: int = 1) -> int:
        """Optimizer steps of the whole run, given how many micro-batches one epoch has per process."""
        if self.train.max_steps is not None:
            return self.train.max_steps
        accum = self.train.accum_steps(num_processes)
        return max(1, math.floor(self.train.epochs * micro_batches_per_epoch / accum))

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

from arbooth.adapt.methods import METHODS
from arbooth.errors import ConfigError

# The released VAR family (FoundationVision/VAR models/__init__.py build_vae_var): width 64 per layer.
VAR_WIDTH_PER_DEPTH = 64


@dataclass(frozen=True)
class ModelConfig:
    depth: int = 16                       # transformer depth (16, 20, 24, 30 are released)
    vae_ckpt: str | None = None           # vae_ch160v4096z32.pth; None = random weights (tests only)
    var_ckpt: str | None = None           # var_d{depth}.pth; None = random weights (tests only)
    num_classes: int = 1000               # size of the pretrained class table; dataset labels index it
    embed_dim: int | None = None          # None = 64 * depth, as released
    num_heads: int | None = None          # None = depth, as released
    mlp_ratio: float = 4.0
    shared_aln: bool = False
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    vocab_size: int = 4096
    z_channels: int = 32
    vae_ch: int = 160
    share_quant_resi: int = 4
    vae_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # released tokenizer: 16x down-sampling
    vae_num_res_blocks: int = 2           # resnet blocks per tokenizer level (released: 2)
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% slower

    def __post_init__(self) -> None:
        if self.depth < 1 or self.num_classes < 1:
            raise ConfigError("model.depth and model.num_classes must be positive")
        if list(self.patch_nums) != sorted(self.patch_nums) or not self.patch_nums:
            raise ConfigError(f"model.patch_nums must be increasing, got {self.patch_nums}")

    @property
    def width(self) -> int:
        return self.embed_dim or VAR_WIDTH_PER_DEPTH * self.depth

    @property
    def heads(self) -> int:
        return self.num_heads or self.depth

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * 2 ** (len(self.vae_ch_mult) - 1)


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
class MethodConfig:
    name: str = "lora"                    # one of arbooth.adapt.METHODS
    lora_rank: int = 16
    lora_alpha: int = 32                  # the authors' code sets alpha = 2 * rank
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"method.name {self.name!r} is not one of {', '.join(METHODS)}")
        if self.lora_rank < 1:
            raise ConfigError("method.lora_rank must be >= 1")


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
    every: int = 10                       # optimizer steps between console/TensorBoard lines
    tensorboard: bool = False
    wandb: bool = False
    sample_every: int = 0                 # optimizer steps between sample grids; 0 = off
    sample_classes: tuple[int, ...] = (0, 1, 2, 3)
    sample_per_class: int = 2
    sample_cfg: float = 1.5
    sample_top_k: int = 900
    sample_top_p: float = 0.96


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

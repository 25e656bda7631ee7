"""Every non-private config in configs/class/ carries the paper's per-dataset hyper-parameters
(Appendix B, identical for d16 and d20), with the batch as the logical (global) batch."""
from __future__ import annotations

from pathlib import Path

import pytest

from arbooth.config import from_dict, load_config
from arbooth.errors import ConfigError
from arbooth.recipes.class_config import ClassTrainConfig, TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "class"
# dataset: {method: (lr, logical batch, epochs)}; LoRA rank 16 everywhere
PAPER = {
    "cub200": {"fft": (1e-4, 512, 50), "lora": (1e-3, 512, 40), "lntuning": (1e-3, 512, 40)},
    "food101": {"fft": (1e-4, 256, 30), "lora": (5e-4, 256, 6), "lntuning": (5e-4, 256, 6)},
    "flowers102": {"fft": (1e-4, 256, 24), "lora": (5e-4, 256, 40), "lntuning": (5e-4, 256, 45)},
    "oxford_pets": {"fft": (1e-4, 256, 40), "lora": (5e-4, 256, 50), "lntuning": (5e-4, 256, 50)},
    "stanford_cars": {"fft": (1e-4, 256, 50), "lora": (5e-4, 256, 50), "lntuning": (5e-4, 256, 50)},
}
CASES = [(ds, m, d) for ds in PAPER for m in PAPER[ds] for d in (16, 20)]


def test_every_config_file_is_a_case() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(f"{ds}_{m}_d{d}" for ds, m, d in CASES)


@pytest.mark.parametrize(("dataset", "method", "depth"), CASES)
def test_paper_values(dataset: str, method: str, depth: int) -> None:
    cfg = load_config(ClassTrainConfig, CONFIGS / f"{dataset}_{method}_d{depth}.yaml")
    lr, batch, epochs = PAPER[dataset][method]
    assert (cfg.method.name, cfg.model.depth) == (method, depth)
    assert (cfg.optim.lr, cfg.train.global_batch_size, cfg.train.epochs) == (lr, batch, epochs)
    if method == "lora":
        assert (cfg.method.lora_rank, cfg.method.alpha) == (16, 32)
    # the same optimizer steps on 1 and 8 GPUs: the logical batch does not depend on the process count
    assert cfg.train.logical_batch(1) == cfg.train.logical_batch(8) == batch
    assert cfg.train.accum_steps(1) == 8 * cfg.train.accum_steps(8)
    # the authors' released values the paper does not state
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
    assert cfg.optim.grad_clip == (1.0 if method == "fft" else 0.1) and cfg.optim.label_smoothing == 0.0
    assert (cfg.data.hflip, cfg.data.mid_reso, cfg.data.image_size) == (False, 1.125, 256)


def test_global_batch_derives_accumulation_and_rejects_what_does_not_divide() -> None:
    t = TrainConfig(batch_size=32, global_batch_size=256)
    assert [t.accum_steps(n) for n in (1, 2, 8)] == [8, 4, 1]
    with pytest.raises(ConfigError, match="not a multiple"):
        t.accum_steps(16)  # 32 x 16 > 256
    with pytest.raises(ConfigError, match="not a multiple"):
        TrainConfig(batch_size=32, global_batch_size=96).accum_steps(2)
    with pytest.raises(ConfigError, match="multiple of train.batch_size"):
        TrainConfig(batch_size=32, global_batch_size=100)
    with pytest.raises(ConfigError, match="not both"):
        from_dict(ClassTrainConfig, {"train": {"global_batch_size": 64, "grad_accum": 2}})
    assert TrainConfig(batch_size=4, grad_accum=3).accum_steps(8) == 3  # explicit accumulation: per process
    assert TrainConfig().accum_steps(2) == 1
    cfg = from_dict(ClassTrainConfig, {"train": {"global_batch_size": 256, "batch_size": 32, "epochs": 2}})
    assert cfg.total_steps(micro_batches_per_epoch=100, num_processes=1) == 25  # 2 x 100 / 8
    assert cfg.total_steps(micro_batches_per_epoch=50, num_processes=2) == 25   # 2 x 50 / 4

"""Config of the differentially private class-conditional recipe (`arbooth train-class` with a `privacy`
section; arbooth/recipes/train_class_dp.py), and the one reader that decides between the two recipes.

The `privacy` section is documented in arbooth/privacy/config.py; every other section is the
non-private recipe's (arbooth/recipes/class_config.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from arbooth.config import load_config, parse_overrides
from arbooth.errors import ConfigError
from arbooth.privacy.config import PrivacyConfig
from arbooth.recipes.class_config import SAFE_RESUME_KEYS, STEP_BUDGET_KEYS, ClassTrainConfig

# A DP resume may change only what does not touch the privacy analysis or the data stream: the non-private
# safe set without the step budget (sigma was calibrated for the planned steps); no privacy.* key is safe.
DP_SAFE_RESUME_KEYS = tuple(k for k in SAFE_RESUME_KEYS if k not in STEP_BUDGET_KEYS)


@dataclass(frozen=True)
class ClassDPConfig(ClassTrainConfig):
    """The class-conditional config plus its `privacy` section."""

    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.gradient_checkpointing:
            raise ConfigError("model.gradient_checkpointing re-runs forward hooks, which Opacus' per-sample "
                              "gradients cannot follow; use privacy.max_physical_batch_size to save memory")

    def without_privacy(self) -> ClassTrainConfig:
        return ClassTrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ClassTrainConfig)})

    def run_dir(self, epsilon: float) -> Path:
        """Where the run at target `epsilon` writes: `train.out_dir`, or `train.out_dir/eps_<epsilon>/`
        for one value of a sweep."""
        out = Path(self.train.out_dir)
        return out / f"eps_{epsilon:g}" if self.privacy.is_sweep else out


def load_class_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ClassTrainConfig:
    """A ClassDPConfig when the YAML or an override has a `privacy` section, else a ClassTrainConfig:
    `arbooth train-class` can dispatch on `isinstance(cfg, ClassDPConfig)`."""
    raw = yaml.safe_load(Path(path).read_text()) if path is not None and Path(path).is_file() else {}
    private = "privacy" in (raw or {}) or "privacy" in parse_overrides(overrides)
    return load_config(ClassDPConfig if private else ClassTrainConfig, path, overrides)

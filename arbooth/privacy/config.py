"""The `privacy` section of a training config: DP-SGD through Opacus (see docs/privacy.md).

Imports nothing heavy, so config loading and validation stay cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from arbooth.errors import ConfigError


@dataclass(frozen=True)
class PrivacyConfig:
    # Target epsilon of the whole run; a list is a sweep (one run per value, e.g. the paper's Table 3).
    epsilon: float | tuple[float, ...] = 10.0
    delta: float | None = None            # None = 1 / (number of training examples)
    # pld: Google's dp-accounting PLD (tight, robust to epsilon 1000); rdp: Opacus' RDP over wider
    # orders (looser); prv: Opacus' PRV (tight, fails at large epsilon). See arbooth/privacy/accountants.py.
    accountant: Literal["pld", "rdp", "prv"] = "pld"
    sample_rate: float = 0.251            # Poisson sampling rate q; expected logical batch q * N
    max_grad_norm: float = 1.0            # per-example clipping norm C
    aug_multiplicity: int = 1             # K augmented views per example, gradients averaged before clipping
    # How per-example gradients are clipped (same clipped sum, different cost; docs/privacy.md):
    # explicit = Opacus' per-example gradients; ghost = Opacus' ghost clipping (two backward passes);
    # book_keeping = ghost norms and the clipped sum from one backward (arbooth/privacy/bookkeeping.py).
    clipping: Literal["explicit", "ghost", "book_keeping"] = "book_keeping"
    max_physical_batch_size: int = 8      # examples per forward pass (each K views); logical batch is split
    noise_seed: int | None = None         # seed of the noise generator; None = fresh entropy (never reuse)
    # delta above 1/N is refused: a mechanism that publishes one random training example outright is
    # (0, 1/N)-DP, so such a guarantee says nothing. true: accept it anyway (experiments, audits).
    allow_large_delta: bool = False

    def __post_init__(self) -> None:
        for eps in self.epsilons:
            if not eps > 0:
                raise ConfigError(f"privacy.epsilon must be > 0, got {eps}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must lie in (0, 1), got {self.delta}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"privacy.sample_rate must lie in (0, 1], got {self.sample_rate}")
        if self.max_grad_norm <= 0:
            raise ConfigError("privacy.max_grad_norm must be > 0")
        if self.aug_multiplicity < 1 or self.max_physical_batch_size < 1:
            raise ConfigError("privacy.aug_multiplicity and privacy.max_physical_batch_size must be >= 1")

    @property
    def epsilons(self) -> tuple[float, ...]:
        return self.epsilon if isinstance(self.epsilon, tuple) else (self.epsilon,)

    @property
    def is_sweep(self) -> bool:
        return len(self.epsilons) > 1

    def check_delta(self, num_examples: int) -> float:
        """The delta of a run on `num_examples` (`delta_for`), refused (ConfigError, one line) when it is
        above 1/N unless `allow_large_delta`. Call it before any weights load."""
        delta = self.delta_for(num_examples)
        if delta > 1.0 / num_examples and not self.allow_large_delta:
            raise ConfigError(f"privacy.delta={delta:g} is above 1/N = 1/{num_examples}: publishing one random "
                              "training image meets such a guarantee, so it protects nothing; choose "
                              f"privacy.delta <= {1 / num_examples:.3g} (default 1/N), or pass "
                              "privacy.allow_large_delta=true to accept it")
        return delta

    def delta_for(self, num_examples: int) -> float:
        """The configured delta, or 1/N (the paper's choice; Opacus' tutorials use the same)."""
        if num_examples < 1:
            raise ConfigError("cannot train privately on an empty dataset")
        return self.delta if self.delta is not None else 1.0 / num_examples

"""DP-SGD through Opacus: Poisson sampling, per-example clipping, calibrated Gaussian noise, accounting.

`make_private(model, optimizer, dataset, ...)` returns a `PrivateTraining` that holds the four Opacus
pieces a DP loop needs and nothing else:
- the model wrapped in a GradSampleModule that understands augmentation multiplicity
  (`arbooth.privacy.views`), in one of three clipping modes (`CLIPPING`, docs/privacy.md):
  `explicit` (Opacus' per-sample gradients, clipped by the optimizer), `ghost` (Opacus' ghost clipping:
  norms, then a second backward of the clip-weighted loss) or `book_keeping` (ghost norms and the
  clipped sum from ONE backward, `arbooth.privacy.bookkeeping`); all three give the same clipped sum;
- a DPOptimizer (clip each example's gradient to `max_grad_norm`, sum, add N(0, (sigma*C)^2) noise,
  divide by the expected batch q*N), distributed when torch.distributed is initialised;
- a Poisson-sampling DPDataLoader with rate q (batches of random size, possibly empty);
- the accountant (`pld`, `rdp` or `prv`, `arbooth.privacy.accountants`) and the noise multiplier sigma,
  calibrated BEFORE the first step from (target epsilon, delta, q, number of steps).

It builds these from Opacus' own classes rather than `PrivacyEngine.make_private`, because that call
accepts only Opacus' stock GradSampleModule types. The accountant is stepped from the optimizer's step
hook (Opacus' accounting extension point), and the same hook is the budget guard: a step whose release
would push epsilon past the target raises `PrivacyBudgetExceeded` before the parameters change.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.data_loader import DPDataLoader
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import Dataset

from arbooth.errors import ArboothError, ConfigError
from arbooth.privacy.accountants import (
    calibrate_noise,
    history_after_step,
    make_accountant,
    nonnegative_epsilon,
)
from arbooth.privacy.bookkeeping import BookKeepingGradSampleModule
from arbooth.privacy.views import ViewsGradSampleModule, ViewsGradSampleModuleGhost

log = logging.getLogger(__name__)


class PrivacyBudgetExceeded(ArboothError):
    """The next optimizer step would spend more than the target epsilon; it was not taken."""


CLIPPING = ("explicit", "ghost", "book_keeping")


class EpsilonMeter:
    """Epsilon of an accountant's history, as its `get_epsilon(delta)` computes it, but cheap per step.

    Opacus' RDP accountant recomputes the RDP curve of every (sigma, q) entry on each call, which
    takes about a second at large sigma (fractional orders). RDP composes additively and is linear in
    the number of steps (opacus/accountants/analysis/rdp.py compute_rdp: `rdp * steps`), so we keep
    one curve per (sigma, q) and sum: the same numbers, computed once. PLD and PRV are delegated to a
    copy of the accountant, and the last answer is kept: the budget guard asks for the history after
    the next step, and the log line after that step asks for the same history again.
    """

    def __init__(self, accountant: IAccountant, delta: float) -> None:
        self.accountant, self.delta = accountant, delta
        self._curves: dict[tuple[float, float], np.ndarray] = {}
        self._last: tuple[tuple, float] | None = None

    def __call__(self, history: list[tuple[float, float, int]]) -> float:
        if not history:
            return 0.0
        if not isinstance(self.accountant, RDPAccountant):
            key = tuple(map(tuple, history))
            if self._last is None or self._last[0] != key:
                acc = copy.deepcopy(self.accountant)
                acc.history = list(history)
                self._last = (key, nonnegative_epsilon(float(acc.get_epsilon(self.delta))))
            return self._last[1]
        alphas = self.accountant.DEFAULT_ALPHAS
        rdp = sum(n * self._curve(sigma, q, alphas) for sigma, q, n in history)
        eps, _ = rdp_analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=self.delta)
        return nonnegative_epsilon(float(eps))

    def _curve(self, sigma: float, q: float, alphas: list[float]) -> np.ndarray:
        if (sigma, q) not in self._curves:
            self._curves[(sigma, q)] = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                                                orders=alphas)
        return self._curves[(sigma, q)]


@dataclass
class PrivateTraining:
    module: nn.Module                # ViewsGradSampleModule[Ghost] (around DPDDP when distributed)
    optimizer: DPOptimizer
    data_loader: DPDataLoader
    accountant: IAccountant
    noise_multiplier: float
    sample_rate: float
    delta: float
    target_epsilon: float
    max_grad_norm: float
    views: int
    clipping: str                    # one of CLIPPING
    meter: EpsilonMeter

    def epsilon(self) -> float:
        """Privacy spent so far, from the accountant's history (0 before the first step)."""
        return self.meter(self.accountant.history)

    @property
    def steps_taken(self) -> int:
        return sum(n for _, _, n in self.accountant.history)

    def backward(self, loss_N: torch.Tensor) -> torch.Tensor:
        """Backward of per-row losses (N = B*K rows, K views of each example next to each other).

        The rows of one example are averaged; the returned loss (for logging) is the mean over examples.
        `ghost` runs Opacus' two backward passes (norms, then the clip-weighted loss); `book_keeping`
        one backward that leaves the clipped sum in p.grad.
        """
        loss_B = loss_N.reshape(-1, self.views).mean(1)
        if self.clipping == "ghost":
            DPTensorFastGradientClipping(self.module, self.optimizer, loss_B, "mean").backward()
        elif self.clipping == "book_keeping":
            self.module.backward(loss_B)
        else:
            # mean over B examples == mean over N rows; the module rescales backprops per example.
            # An empty Poisson batch backpropagates an empty sum (zero-size per-example gradients).
            (loss_B.mean() if loss_B.numel() else loss_N.sum()).backward()
        return loss_B.detach().mean() if loss_B.numel() else loss_B.detach().sum()

    def state_dict(self) -> dict:
        """What a resumed run needs to continue this one exactly (issue 16): the accountant's state (its
        own `state_dict`: the history of (sigma, q, steps)), the calibrated sigma and the settings it was
        calibrated for, the noise generator's state and the wrapped optimizer's state. The Poisson
        sampler's position is the recipe's (it knows the epoch); see train_class_dp."""
        gen = self.optimizer.generator
        return {"accountant": self.accountant.state_dict(), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta, "target_epsilon": self.target_epsilon,
                "max_grad_norm": self.max_grad_norm, "views": self.views, "clipping": self.clipping,
                "noise_generator": gen.get_state() if gen is not None else None,
                "optimizer": self.optimizer.original_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`. Refuses (CheckpointError) a state written for other privacy settings;
        the saved sigma is kept (the accountant's history was spent with it)."""
        from arbooth.errors import CheckpointError

        now = {"sample_rate": self.sample_rate, "delta": self.delta, "target_epsilon": self.target_epsilon,
               "max_grad_norm": self.max_grad_norm, "views": self.views}
        diff = [f"{k} {state.get(k)!r} -> {v!r}" for k, v in now.items() if state.get(k) != v]
        if diff:
            raise CheckpointError("the saved DP state was written with other privacy settings: " + "; ".join(diff))
        if state["noise_multiplier"] != self.noise_multiplier:
            log.warning("the saved run was calibrated to sigma %.6g, this one to %.6g; keeping the saved sigma",
                        state["noise_multiplier"], self.noise_multiplier)
        self.noise_multiplier = self.optimizer.noise_multiplier = float(state["noise_multiplier"])
        self.accountant.load_state_dict(state["accountant"])
        if state["noise_generator"] is not None and self.optimizer.generator is not None:
            self.optimizer.generator.set_state(state["noise_generator"])
        self.optimizer.original_optimizer.load_state_dict(state["optimizer"])

    def physical_batches(self, max_physical_batch_size: int) -> BatchMemoryManager:
        """Context manager yielding a loader of physical batches; the optimizer steps once per logical
        (Poisson) batch and skips the other `step()` calls (Opacus' BatchMemoryManager)."""
        return BatchMemoryManager(data_loader=self.data_loader, optimizer=self.optimizer,
                                  max_physical_batch_size=max_physical_batch_size)


def _guarded_accounting_hook(pt: PrivateTraining) -> Callable[[DPOptimizer], None]:
    def hook(optim: DPOptimizer) -> None:
        q = pt.sample_rate * optim.accumulated_iterations  # as Opacus' IAccountant.get_optimizer_hook_fn
        eps = pt.meter(history_after_step(pt.accountant.history, optim.noise_multiplier, q))
        if eps > pt.target_epsilon:
            raise PrivacyBudgetExceeded(
                f"step {pt.steps_taken + 1} would spend epsilon {eps:.4g} > target {pt.target_epsilon:g} "
                f"(delta {pt.delta:.3g}); stopping before it")
        pt.accountant.step(noise_multiplier=optim.noise_multiplier, sample_rate=q)
    return hook


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset, *,
                 target_epsilon: float, delta: float, sample_rate: float, steps: int,
                 max_grad_norm: float, views: int = 1, clipping: str = "explicit", accountant: str = "pld",
                 noise_multiplier: float | None = None, noise_generator: torch.Generator | None = None,
                 sampling_generator: torch.Generator | None = None,
                 collate_fn: Callable | None = None, num_workers: int = 0) -> PrivateTraining:
    """Wrap `model` (trainable parameters already chosen), `optimizer` and `dataset` for DP-SGD (Abadi et
    al. 2016, through Opacus' GradSampleModule, DPOptimizer and Poisson DataLoader).

    Each example's gradient, the mean over its `views` augmented views, is clipped to L2 norm
    `max_grad_norm`, the clipped gradients are summed and Gaussian noise of standard deviation
    sigma * max_grad_norm is added. `sample_rate` in (0, 1] is the Poisson rate q; `steps` is the number
    of logical steps the run will take; sigma is calibrated so that exactly those steps spend at most
    (`target_epsilon`, `delta`) under `accountant` ("pld", "rdp" or "prv"). `noise_multiplier` overrides
    the calibration (tests, audits). `clipping` is one of CLIPPING ("explicit", "ghost": Opacus' two-pass
    ghost clipping, "book_keeping": one backward, arbooth.privacy.bookkeeping). Under
    torch.distributed each process samples its shard at rate q and only rank 0 adds noise (Opacus'
    DistributedDPOptimizer). Raises ConfigError for a rate outside (0, 1], an unknown clipping mode or
    accountant, a budget no sigma meets, or a model Opacus' ModuleValidator rejects; the returned PrivateTraining raises PrivacyBudgetExceeded instead of a
    step that would exceed the target.
    """
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must lie in (0, 1], got {sample_rate}")
    if clipping not in CLIPPING:
        raise ConfigError(f"unknown clipping mode `{clipping}`; choose one of {', '.join(CLIPPING)}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"model is not DP-compatible (Opacus ModuleValidator): {errors[0]}")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if noise_multiplier is None:
        noise_multiplier = calibrate_noise(target_epsilon=target_epsilon, delta=delta,
                                           sample_rate=sample_rate, steps=steps, accountant=accountant)
    inner = DPDDP(model) if distributed else model
    if clipping == "ghost":
        module = ViewsGradSampleModuleGhost(inner, views=views, max_grad_norm=max_grad_norm)
    elif clipping == "book_keeping":
        module = BookKeepingGradSampleModule(inner, views=views, max_grad_norm=max_grad_norm)
    else:
        module = ViewsGradSampleModule(inner, views=views)
    loader = DPDataLoader(dataset, sample_rate=sample_rate, distributed=distributed,
                          generator=sampling_generator, collate_fn=collate_fn, num_workers=num_workers)
    world = torch.distributed.get_world_size() if distributed else 1
    optim_cls = get_optimizer_class(clipping="flat", distributed=distributed,
                                    grad_sample_mode="hooks" if clipping == "explicit" else "ghost")
    dp_optimizer = optim_cls(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                             expected_batch_size=max(1, int(len(dataset) * sample_rate)) / world,  # as PrivacyEngine
                             loss_reduction="mean", generator=noise_generator)
    acc = make_accountant(accountant, epsilon_hint=target_epsilon)
    pt = PrivateTraining(module=module, optimizer=dp_optimizer, data_loader=loader, accountant=acc,
                         noise_multiplier=noise_multiplier, sample_rate=sample_rate, delta=delta,
                         target_epsilon=target_epsilon, max_grad_norm=max_grad_norm, views=views, clipping=clipping,
                         meter=EpsilonMeter(acc, delta))
    dp_optimizer.attach_step_hook(_guarded_accounting_hook(pt))
    log.info("DP-SGD: target epsilon %g, delta %.3g, q %.4g, %d steps -> noise multiplier %.4f (%s), "
             "C %g, %d view(s), %s clipping", target_epsilon, delta, sample_rate, steps, noise_multiplier,
             accountant, max_grad_norm, views, clipping)
    return pt

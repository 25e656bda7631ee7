"""Privacy accountants for the Poisson-subsampled Gaussian mechanism of DP-SGD, and noise calibration.

Three accountants, all behind Opacus' `IAccountant` interface (history of (sigma, q, steps); `step`,
`get_epsilon(delta)`, `state_dict()` / `load_state_dict()`), so the DP optimizer's step hook, the
budget guard and checkpoints treat them alike:
- `rdp`: Opacus' RDP accountant (Mironov 2017; Mironov, Talwar & Zhang 2019) over a wider range of
  orders than its default (`RDP_ORDERS`): at epsilon ~1000 (q 0.251, 240 steps) the optimal order is
  1.04, below Opacus' smallest (1.1), where it warns "optimal order is the smallest alpha" and its bound
  is looser than it needs to be; large orders (up to 256) cover small epsilon with many steps. An upper
  bound; loose by 10-20% against PLD at the paper's settings.
- `prv`: Opacus' PRV accountant (Gopi, Lee & Wutschitz 2021). Tight, but numerically fragile at large
  epsilon: below some sigma its epsilon jumps to infinity (q 0.251, 240 steps: 540 at sigma 0.25, inf at
  0.22), so a target near 1000 cannot be reached (see `calibrate_noise`).
- `pld`: Google's `dp-accounting` privacy-loss-distribution accountant (Koskela et al. 2020; Doroshenko
  et al. 2022, "Connect the Dots"), pessimistic discretisation: an upper bound that is tight to the
  discretisation interval and stays finite and fast up to epsilon 1000 and beyond. The default.

`calibrate_noise` is one bounded search for all three: sigma such that the planned run spends at most the
target epsilon, or a one-line `ConfigError` naming the accountant and the target.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

from arbooth.errors import ConfigError

ACCOUNTANTS = ("pld", "rdp", "prv")
# Opacus' default orders (1.1 ... 10.9, 12 ... 63) plus a few near 1 (large epsilon; fractional orders
# near 1 cost ~0.3 s each to evaluate, so only five) and large ones (small epsilon, many steps).
RDP_ORDERS = ([1.01, 1.02, 1.03, 1.05, 1.07] + [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
              + [80, 96, 128, 192, 256])
MAX_SIGMA = 1e6
# The smallest noise multiplier calibration tries: each evaluation slows down as sigma shrinks (PLD: 3 s at
# 0.05 for q 0.251 and 240 steps, 74 s at 0.01; PRV allocates tens of GB below ~0.01), and a target that
# sigma 0.05 already meets (epsilon ~16000 at the paper's largest setting) does not bind.
MIN_SIGMA = 0.05
MAX_EVALUATIONS = 64  # of the accountant, per calibration: bounds its time whatever the accountant does


class WideRDPAccountant(RDPAccountant):
    """Opacus' RDP accountant over `RDP_ORDERS`."""

    DEFAULT_ALPHAS = RDP_ORDERS


def history_after_step(history: list[tuple[float, float, int]], sigma: float, q: float) -> list:
    """An accountant history `[(noise_multiplier, sample_rate, steps), ...]` after one more step: a run of
    equal (sigma, q) is one entry, as Opacus' RDP/PRV accountants merge it. Returns a new list."""
    if history and tuple(history[-1][:2]) == (sigma, q):
        return [*history[:-1], (sigma, q, history[-1][2] + 1)]
    return [*history, (sigma, q, 1)]


class PLDAccountant(IAccountant):
    """Opacus accountant interface over `dp_accounting.pld.PLDAccountant` (add-or-remove-one neighbours,
    as Opacus' RDP/PRV accountants and the guarantee in docs/privacy.md).

    `value_discretization_interval` (privacy-loss units): the PLD is rounded up (pessimistic) to this
    grid, so epsilon is overestimated by at most about this much per composition; None chooses
    1e-3 * epsilon_hint clamped to [1e-4, 1e-2] (about 0.5 s per evaluation at epsilon 1000)."""

    def __init__(self, value_discretization_interval: float | None = None, epsilon_hint: float = 10.0) -> None:
        super().__init__()
        if value_discretization_interval is None:
            value_discretization_interval = min(1e-2, max(1e-4, 1e-3 * epsilon_hint))
        self.value_discretization_interval = value_discretization_interval

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        self.history = history_after_step(self.history, noise_multiplier, sample_rate)

    def get_epsilon(self, delta: float, **kwargs) -> float:
        from dp_accounting import dp_event
        from dp_accounting.pld import pld_privacy_accountant

        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=self.value_discretization_interval)
        for sigma, q, n in self.history:
            acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), int(n))
        return float(acc.get_epsilon(delta))

    def __len__(self) -> int:
        return len(self.history)

    @classmethod
    def mechanism(cls) -> str:
        return "pld"


def make_accountant(name: str, epsilon_hint: float = 10.0) -> IAccountant:
    """A fresh accountant by config name (`privacy.accountant`). Raises ConfigError for another name."""
    if name == "pld":
        return PLDAccountant(epsilon_hint=epsilon_hint)
    if name == "rdp":
        return WideRDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ConfigError(f"unknown accountant `{name}`; choose one of {', '.join(ACCOUNTANTS)}")


def epsilon_of(name: str, *, sigma: float, sample_rate: float, steps: int, delta: float,
               epsilon_hint: float = 10.0) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps; inf where the accountant fails or overflows,
    0 where it returns a negative value (`nonnegative_epsilon`)."""
    acc = make_accountant(name, epsilon_hint)
    acc.history = [(sigma, sample_rate, steps)]
    try:
        eps = float(acc.get_epsilon(delta))
    except (ValueError, ArithmeticError, RuntimeError, MemoryError):  # PRV's domain errors at small sigma
        return math.inf
    return nonnegative_epsilon(eps) if not math.isnan(eps) else math.inf


def nonnegative_epsilon(eps: float) -> float:
    """An accountant's epsilon, with a negative value read as 0. Opacus' RDP-to-DP conversion
    (Balle et al. 2020: rdp - (log delta + log alpha) / (alpha - 1) + log((alpha - 1) / alpha)) is negative
    at large delta: the mechanism is then (0, delta)-DP, since (eps, delta)-DP with eps < 0 implies it. It
    is not infinity, which made every sigma look infeasible ("no noise multiplier up to 1e6")."""
    return max(0.0, eps)


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "pld", rel_tol: float = 1e-3,
                    epsilon_fn: Callable[[float], float] | None = None) -> float:
    """The smallest sigma (to `rel_tol`) whose planned run spends at most `target_epsilon`.

    A bisection in log sigma with at most MAX_EVALUATIONS accountant calls that always keeps a feasible
    upper end, so the answer is safe however the accountant behaves. It stops when the feasible end
    spends within max(0.01, rel_tol * target) of the target or the bracket is rel_tol wide. Raises
    ConfigError (one line, naming the accountant and the target) when no sigma up to 1e6 meets the
    target, when even MIN_SIGMA meets it (the target does not bind: at a large delta every sigma does), or when the accountant cannot resolve the target: the best feasible sigma spends less than
    90% of it because its epsilon jumps past the target (PRV's infinity at large epsilon).
    `epsilon_fn` replaces the accountant (tests)."""
    if steps < 1:
        raise ConfigError(f"a private run needs at least one step, got {steps}")
    if not target_epsilon > 0:
        raise ConfigError(f"the target epsilon must be > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must lie in (0, 1), got {delta}")
    if math.isinf(target_epsilon):  # no budget (tests, audits' non-private baselines): no noise
        return 0.0
    eps_of = epsilon_fn or (lambda s: epsilon_of(accountant, sigma=s, sample_rate=sample_rate, steps=steps,
                                                 delta=delta, epsilon_hint=target_epsilon))
    what = f"privacy.accountant={accountant} at target epsilon {target_epsilon:g} (delta {delta:.3g}, " \
           f"q {sample_rate:g}, {steps} steps)"
    evals, finite = 0, False

    def eps(s: float) -> float:
        nonlocal evals, finite
        evals += 1
        e = eps_of(s)
        e = nonnegative_epsilon(e) if not math.isnan(e) else math.inf
        finite = finite or math.isfinite(e)
        return e

    def does_not_bind(sigma: float, e: float) -> ConfigError:
        void = " (epsilon 0: at this delta the guarantee says nothing)" if e == 0 else ""
        return ConfigError(f"{what}: the target does not bind: even noise multiplier {sigma:.3g} spends only "
                           f"epsilon {e:.4g}{void}; choose a smaller privacy.epsilon or privacy.delta")

    lo, hi = 0.0, 1.0
    eps_lo, eps_hi = math.inf, eps(hi)
    while eps_hi > target_epsilon:  # grow until feasible
        lo, eps_lo, hi = hi, eps_hi, hi * 2
        if hi > MAX_SIGMA or evals >= MAX_EVALUATIONS:
            if not finite:  # PRV at a large delta: "Cannot compute epsilon" at every sigma
                raise ConfigError(f"{what}: the accountant cannot compute epsilon at this delta for any noise "
                                  "multiplier; use privacy.accountant=pld or a smaller privacy.delta")
            raise ConfigError(f"{what}: no noise multiplier up to {MAX_SIGMA:g} meets the budget")
        eps_hi = eps(hi)
    if lo == 0.0:  # 1 is feasible: shrink until infeasible, down to MIN_SIGMA (bounded time)
        lo = hi / 2
        while (e := eps(lo)) <= target_epsilon:
            if lo <= MIN_SIGMA or evals >= MAX_EVALUATIONS:
                raise does_not_bind(lo, e)
            hi, eps_hi, lo = lo, e, max(lo / 2, MIN_SIGMA)
        eps_lo = e
    # Regula falsi (Illinois) on f = log(epsilon / target) against log sigma, nearly linear for these
    # mechanisms; a bisection step while the infeasible end is infinite. The feasible end is always kept.
    def f(e: float) -> float:
        return math.log(e / target_epsilon) if 0 < e < math.inf else (math.inf if e > 0 else -math.inf)

    f_lo, f_hi, last = f(eps_lo), f(eps_hi), None
    while (target_epsilon - eps_hi > max(0.01, rel_tol * target_epsilon) and hi / lo > 1 + rel_tol
           and evals < MAX_EVALUATIONS):
        x_lo, x_hi = math.log(lo), math.log(hi)
        if math.isfinite(f_lo) and math.isfinite(f_hi):
            x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
            x = min(max(x, x_lo + 0.01 * (x_hi - x_lo)), x_hi - 0.01 * (x_hi - x_lo))
        else:
            x = (x_lo + x_hi) / 2
        mid = math.exp(x)
        e = eps(mid)
        if e <= target_epsilon:
            hi, eps_hi, f_hi = mid, e, f(e)
            f_lo = f_lo / 2 if last == "hi" else f_lo  # Illinois: the kept end's value halves
            last = "hi"
        else:
            lo, f_lo = mid, f(e)
            f_hi = f_hi / 2 if last == "lo" else f_hi
            last = "lo"
    if eps_hi == 0:  # the accountant fails below a sigma that already spends nothing (PRV at a large delta)
        raise does_not_bind(hi, eps_hi)
    if eps_hi < 0.9 * target_epsilon:
        raise ConfigError(f"{what}: the accountant cannot resolve this target (epsilon {eps_hi:.4g} at sigma "
                          f"{hi:.4g}, above the target just below it); use privacy.accountant=pld (or rdp)")
    return hi

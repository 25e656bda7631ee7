"""Paired comparisons across a small number of units (training seeds, benchmark subjects).

`paired_difference(reference, other)`: the mean of other - reference over units paired by index, a
percentile bootstrap 95% interval of that mean (resampling units with replacement, Efron & Tibshirani
1993, ch. 13) and the paired t-test p-value (scipy.stats.ttest_rel). With 4-16 units the interval is
wide and the bootstrap under-covers a little; it is a guide to which differences are noise, not a test
to report alone. Used by `arbooth bench-subject` (units: subjects) and benchmarks/toy_ablation.py
(units: training seeds).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from arbooth.errors import ArboothError


def paired_difference(reference: Sequence[float], other: Sequence[float], *, n_boot: int = 10000,
                      seed: int = 0) -> dict:
    """{"mean", "ci95": [lo, hi], "p", "n"} of other - reference, paired by position. p is NaN for
    fewer than two units or when every difference is equal. Raises ArboothError for unequal lengths
    or no units."""
    import numpy as np
    from scipy import stats

    if len(reference) != len(other):
        raise ArboothError(f"paired difference needs equal lengths, got {len(reference)} and {len(other)}")
    if not reference:
        raise ArboothError("paired difference of no units")
    d = np.asarray(other, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    p = float(stats.ttest_rel(other, reference).pvalue) if len(d) > 1 and d.std() > 0 else math.nan
    return {"mean": float(d.mean()), "ci95": [float(lo), float(hi)], "p": p, "n": len(d)}

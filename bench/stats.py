"""Summaries of paired timings on a shared, noisy machine."""

from __future__ import annotations

import numpy as np


def median_interval(x, level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """The median of `x` (e.g. one paired difference or ratio per round) and a bootstrap interval of
    it: the percentiles of the medians of `resamples` resamples of x."""
    x = np.asarray(x, np.float64)
    medians = np.median(x[np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))], axis=1)
    lo, hi = np.percentile(medians, [50 * (1 - level), 50 * (1 + level)])
    return float(np.median(x)), float(lo), float(hi)

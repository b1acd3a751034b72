"""bench/stats.py: the bootstrap interval of a median covers the true median as often as it claims."""

import numpy as np

from bench.stats import median_interval


def test_median_interval_covers_the_true_median_at_its_level():
    # Exponential(1) draws (skewed, like step times): the true median is ln 2. Of 300 samples of 61
    # draws, a 95% interval should miss it ~15 times; fixed before the run: 90-99% covered.
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(300):
        x = rng.exponential(size=61)
        med, lo, hi = median_interval(x)
        assert med == np.median(x) and lo <= med <= hi
        covered += lo <= np.log(2) <= hi
    assert 0.90 <= covered / 300 <= 0.99, covered


def test_median_interval_narrows_with_more_rounds():
    # The median's standard error falls as 1/sqrt(n): 16x the rounds, about a quarter of the width.
    rng = np.random.default_rng(2)
    widths = [np.mean([np.subtract(*median_interval(rng.normal(size=n))[:0:-1]) for _ in range(20)])
              for n in (25, 400)]
    assert 0.15 <= widths[1] / widths[0] <= 0.35, widths

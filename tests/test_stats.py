"""The report's statistics against computations written out by hand."""
import itertools
import statistics

import numpy as np
import pytest

from pewe.stats import bootstrap_interval, paired_gain


def exact_bootstrap_quantiles(values, level=0.95):
    """Every one of the n**n resamples, enumerated: the exact distribution the bootstrap samples from."""
    means = sorted(statistics.fmean(s) for s in itertools.product(values, repeat=len(values)))
    return np.quantile(means, (1 - level) / 2), np.quantile(means, 1 - (1 - level) / 2)


def test_bootstrap_interval_matches_the_exact_resampling_distribution():
    values = [0.30, -0.05, 0.10, 0.22, 0.0]
    low, high = bootstrap_interval(values, resamples=200_000)
    want_low, want_high = exact_bootstrap_quantiles(values)
    assert low == pytest.approx(want_low, abs=0.004) and high == pytest.approx(want_high, abs=0.004)
    assert bootstrap_interval([0.25] * 4) == (0.25, 0.25)  # no spread, no interval
    assert bootstrap_interval(values) == bootstrap_interval(values)  # seeded: the same report every time


def test_paired_gain_keeps_seeds_paired_and_counts_wins():
    scores = {("Loss", "a"): {1: 0.5, 2: 0.7}, ("random", "a"): {1: 0.4, 2: 0.7},
              ("Loss", "b"): {1: 0.2, 2: 0.1}, ("random", "b"): {1: 0.3, 2: 0.2},
              ("Loss", "c"): {1: 0.9}, ("random", "c"): {2: 0.1}}  # c has no pair: left out
    g = paired_gain(scores, "Loss", "random", ["a", "b", "c"], [1, 2], resamples=50_000)
    per_target = [statistics.fmean([0.1, 0.0]), statistics.fmean([-0.1, -0.1])]
    assert g.mean == pytest.approx(statistics.fmean(per_target)) and g.targets == 2
    assert (g.wins, g.ties, g.losses) == (1, 1, 2)
    # two targets: the resample means are -0.1, -0.025 (twice) and 0.05, each with a quarter of the mass,
    # so the 2.5 % and 97.5 % quantiles are the extremes
    assert g.low == pytest.approx(-0.1) and g.high == pytest.approx(0.05)
    assert not g.above_zero and not g.below_zero
    assert paired_gain(scores, "KL", "random", ["a"], [1]).mean is None

"""Paired comparisons of two initialisations over (target, seed) pairs, with a bootstrap interval.

A gain is ``score(init, target, seed) - score(base, target, seed)`` for every (target, seed) pair that
has both runs (the same seed: the same data order and dropout). The interval resamples targets, not
pairs: a target's seeds stay together (its gain is the mean over its seeds), since the targets are the
sample the answer should hold beyond. The 95 % interval is the percentile interval of the mean over
``resamples`` bootstrap samples drawn with a fixed seed, so a report is the same every time.
"""
from __future__ import annotations

import dataclasses
import statistics

import numpy as np

RESAMPLES = 10_000  # bootstrap samples of the targets
TIE = 1e-9  # |gain| below this is a tie (equal scores)


@dataclasses.dataclass(frozen=True)
class PairedGain:
    mean: float | None  # mean over targets of each target's mean gain over its seeds
    low: float | None  # 95 % bootstrap interval of that mean
    high: float | None
    wins: int  # (target, seed) pairs where the init scored higher / the same / lower
    ties: int
    losses: int
    targets: int  # targets with at least one pair

    @property
    def above_zero(self) -> bool:
        return self.low is not None and self.low > 0

    @property
    def below_zero(self) -> bool:
        return self.high is not None and self.high < 0


def bootstrap_interval(values, resamples=RESAMPLES, seed=0, level=0.95):
    """(low, high): the percentile interval of the mean of ``values`` resampled with replacement."""
    x = np.asarray(values, dtype=np.float64)  # (n,)
    if len(x) == 0:
        return None, None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)  # (resamples,)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_gain(scores: dict, init, base, targets, seeds, resamples=RESAMPLES) -> PairedGain:
    """``scores``: {(init, target): {seed: score}}. The gain of ``init`` over ``base`` on ``targets``."""
    per_target, wins, ties, losses = [], 0, 0, 0
    for t in targets:
        a, b = scores.get((init, t), {}), scores.get((base, t), {})
        diffs = [a[s] - b[s] for s in seeds if s in a and s in b]
        if not diffs:
            continue
        per_target.append(statistics.fmean(diffs))
        wins += sum(d > TIE for d in diffs)
        losses += sum(d < -TIE for d in diffs)
        ties += sum(abs(d) <= TIE for d in diffs)
    if not per_target:
        return PairedGain(None, None, None, 0, 0, 0, 0)
    low, high = bootstrap_interval(per_target, resamples)
    return PairedGain(statistics.fmean(per_target), low, high, wins, ties, losses, len(per_target))

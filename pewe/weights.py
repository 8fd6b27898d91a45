"""Weights of the source deltas for each target, from scores or from a division into groups.

- ``loo_weights``: w_s = softmax(sign * score(s, t) / T) over the sources other than the target t,
  where ``sign`` is the score's direction (``pewe.scores``; the original negated every score, which
  inverts the scores where higher means more similar);
- ``average_weights`` / ``group_weights``: the baselines, a plain average of all other sources or of
  the other members of a hand-made group.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pewe.layout import read_similarity_meta
from pewe.scores import ScoreError, check_temperature, score_spec


EnsembleError = ScoreError  # one error class for scores and the weights made from them


def metric_sign(metric: str) -> int:
    """The sign of ``metric`` (case, spaces and dashes ignored: "KL-divergence" is KL)."""
    return score_spec(metric).sign


def file_sign(sim_path, metric: str) -> int:
    """The sign for a similarity file: its ``scores.json`` (written beside it) when there is one,
    checked against ``metric``; else the sign of ``metric``."""
    sign = metric_sign(metric)
    info = read_similarity_meta(sim_path)
    if info is not None:
        found = 1 if info["higher_is_more_similar"] else -1
        if found != sign:
            raise EnsembleError(f"{Path(sim_path).parent / 'scores.json'}: the scores are {info['metric']} (higher is "
                                f"{'more' if found > 0 else 'less'} similar), but metric = {metric}")
    return sign


def loo_weights(scores: dict, sources, sign: int, temperature: float, targets=None, where="scores") -> dict:
    """``{target: {source: weight}}``: softmax(sign * score / T) over the sources other than the target.

    ``targets`` defaults to every target of ``scores``; ``where`` names the scores in messages."""
    if sign not in (1, -1):
        raise EnsembleError(f"sign must be +1 or -1, not {sign!r}")
    check_temperature(temperature)
    sources = list(sources)
    out = {}
    for target in (list(scores) if targets is None else targets):
        if target not in scores:
            raise EnsembleError(f"{where}: no scores for target {target}")
        others = [s for s in sources if s != target]
        if not others:
            raise EnsembleError(f"{where}: target {target} has no other source to average")
        missing = [s for s in others if s not in scores[target]]
        if missing:
            raise EnsembleError(f"{where}: target {target} has no score for source(s) {', '.join(missing)}")
        raw = np.array([scores[target][s] for s in others], dtype=np.float64)  # (n_others,)
        if not np.isfinite(raw).all():
            bad = others[int(np.argmin(np.isfinite(raw)))]
            raise EnsembleError(f"{where}: score of source {bad} for target {target} is not finite")
        z = sign * raw / temperature
        if not np.isfinite(z).all():
            raise EnsembleError(f"{where}: scores / T overflow for target {target} (T = {temperature})")
        e = np.exp(z - z.max())  # shifted: the largest term is exp(0) = 1, so the sum is >= 1
        out[target] = dict(zip(others, (e / e.sum()).tolist()))
    return out


def effective_sources(weights) -> float:
    """(sum |w|)^2 / sum w^2: 1 for one source, n for n equal weights, whatever the weights' scale.

    For weights that sum to 1 (softmax, averages) it is 1 / sum w^2; LoraHub's weights need not sum
    to 1 (or be >= 0), and 1 / sum w^2 of its small weights would read as fewer than one source.
    """
    w = np.abs(np.asarray(list(weights), dtype=float))
    square = float((w * w).sum())
    return float(w.sum()) ** 2 / square if square > 0 else float("nan")


def average_weights(sources, targets=None) -> dict:
    """The "average of all" baseline: each target gets 1/(n-1) on every other source."""
    sources = list(sources)
    out = {}
    for target in (sources if targets is None else targets):
        others = [s for s in sources if s != target]
        if not others:
            raise EnsembleError(f"target {target} has no other source to average")
        out[target] = {s: 1.0 / len(others) for s in others}
    return out


def parse_groups(groups) -> list:
    """Groups as lists of names, from lists/tuples or strings "a b c" / "a+b+c" / "a;b;c"."""
    out = []
    for g in groups:
        if isinstance(g, (list, tuple)) and g and all(isinstance(x, (list, tuple)) for x in g):
            out.extend(parse_groups(g))  # a whole list of groups given as one literal
        elif isinstance(g, (list, tuple)):
            out.append([str(x).strip() for x in g if str(x).strip()])
        else:
            out.append([x for x in re.split(r"[\s+;]+", str(g)) if x])
    return out


def group_weights(groups, sources=None, targets=()) -> dict:
    """The manual division: each target of a group gets the plain average of the other members that
    are sources. ``sources``: the pool (None: every member is one); ``targets``: tasks outside the pool
    that may stand in a group (they get the group's sources)."""
    groups = parse_groups(groups)
    seen, out = {}, {}
    for i, group in enumerate(groups):
        if len(group) < 2:
            raise EnsembleError(f"group {i + 1} {group}: needs at least two tasks")
        for task in group:
            if task in seen:
                raise EnsembleError(f"task {task} is in group {seen[task] + 1} and in group {i + 1}")
            if sources is not None and task not in sources and task not in targets:
                raise EnsembleError(f"group {i + 1}: task {task} is not among the sources")
            seen[task] = i
        members = [s for s in group if sources is None or s in sources]
        for target in group:
            others = [s for s in members if s != target]
            if others:
                out[target] = {s: 1.0 / len(others) for s in others}
    return out

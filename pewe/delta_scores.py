"""Scores of a source delta for a target that need no forward pass over the similarity engine: what
``unit_model/unit_model_{cos,Euclidean,Performance}.py`` compute, as the original defines them.

- Cosine (higher = closer): ``delta_cosine(target_random, source)`` = mean over tensors k of
  cos(flat target_k, flat source_k), where target is the delta tuned on the target from random init.
  The original averages the per-tensor cosines with equal weight, whatever the tensor sizes; kept.
- Euclidean (lower = closer): ``delta_distance(source, tuned)`` = sum over tensors k of
  ||source_k - tuned_k||_2 (Frobenius), tuned = the source delta after the short tuning on the target
  (``tune_all_ckpt.py``). The original sums per-tensor norms, which is *not* the norm of the
  concatenated vector (that would be sqrt(sum_k ||.||^2)); kept.
- Performance (higher = closer): ``performance_gain(tuned, zero_shot)`` = dev score after the short
  tuning minus the zero-shot dev score (``dev_all_ckpt.py``).

Score matrices are ``{target: {source: score}}`` and stream over files: one source delta in memory at
a time (plus one target-side delta). They are written in the similarity ``result.tsv`` layout so that
``pewe.ensemble.read_similarity`` and ``unit_model_others.py`` can read them back.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from delta_modules import DeltaError, check_compatible, read_delta, save_delta
from pewe import ensemble as E
from pewe.atomic import atomic_write_text
from pewe.data import DataError

TUNED_CHECKPOINTS = ("best", "last")  # which delta of a short tuning: best by dev (the original's) or last


# --------------------------------------------------------------------------- pure scores

def _check_same_tensors(a: dict, b: dict, where):
    if set(a) != set(b):
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise DeltaError(f"{where}: the two deltas have different tensors (only in the first {missing[:3]}, "
                         f"only in the second {extra[:3]})")
    for k in a:
        if a[k].shape != b[k].shape:
            raise DeltaError(f"{where}: {k} has shape {tuple(a[k].shape)} in one delta, {tuple(b[k].shape)} in the other")


def tensor_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """cos(flat x, flat y) in float64; 0 when either is all zeros (as torch's CosineSimilarity)."""
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    nx, ny = x.norm(), y.norm()
    if nx == 0 or ny == 0:
        return 0.0
    return float(x @ y / (nx * ny))


def delta_cosine(a: dict, b: dict, where="deltas") -> float:
    """Mean over tensors k of cos(flat a_k, flat b_k): each tensor counts once, whatever its size."""
    _check_same_tensors(a, b, where)
    sims = [tensor_cosine(a[k], b[k]) for k in a]
    return math.fsum(sims) / len(sims)


def delta_distance(a: dict, b: dict, where="deltas") -> float:
    """Sum over tensors k of ||a_k - b_k||_2 (Frobenius norm of each difference, then summed)."""
    _check_same_tensors(a, b, where)
    return math.fsum(float((a[k].double() - b[k].double()).norm()) for k in a)


def performance_gain(tuned: float, zero_shot: float) -> float:
    """Dev score after the short tuning on the target minus the zero-shot dev score."""
    return float(tuned) - float(zero_shot)


# --------------------------------------------------------------------------- score matrices

def _read(path, expect_method, ref):
    """(tensors, config) of a delta file, checked against the method and the first file's config."""
    tensors, config, _ = read_delta(path)
    if expect_method is not None and config.method != expect_method:
        raise DeltaError(f"{path}: a {config.method} delta, but delta = {expect_method}")
    if ref:
        check_compatible(ref[1], config, path)
    else:
        ref.extend([path, config])
    return tensors, config


def cosine_scores(target_ckpts: dict, source_ckpts: dict, expect_method=None) -> dict:
    """``{target: {source: delta_cosine(target delta, source delta)}}`` for every (target, source),
    the target's own source included (a sanity check; the weighting leaves it out).

    ``target_ckpts``: {target: its delta tuned from random init}; ``source_ckpts``: {source: path}.
    One target delta and one source delta are in memory at a time."""
    ref, out = [], {}
    for target, tpath in target_ckpts.items():
        tdelta, _ = _read(tpath, expect_method, ref)
        out[target] = {}
        for source, spath in source_ckpts.items():
            sdelta, _ = _read(spath, expect_method, ref)
            out[target][source] = delta_cosine(tdelta, sdelta, where=f"{tpath} vs {spath}")
            del sdelta
    return out


def tuned_checkpoint(tuned_dir, target, source, which="best") -> Path:
    """``{tuned_dir}/{target}/{source}/checkpoint-{which}.safetensors`` (written by tune_all_ckpt.py)."""
    if which not in TUNED_CHECKPOINTS:
        raise E.EnsembleError(f"tuned_checkpoint must be best or last, not {which!r}")
    path = Path(tuned_dir) / target / source / f"checkpoint-{which}.safetensors"
    if not path.is_file():
        raise DeltaError(f"{path}: no such tuned delta (run tune_all_ckpt.py for target {target}, source {source})")
    return path


def euclidean_scores(source_ckpts: dict, tuned_dir, targets, which="best", expect_method=None) -> dict:
    """``{target: {source: delta_distance(source delta, source delta tuned on target)}}`` for every
    target and every other source. Sources outer: each source and each tuned delta is read once."""
    paths = {(t, s): tuned_checkpoint(tuned_dir, t, s, which) for t in targets for s in source_ckpts if s != t}
    ref, out = [], {t: {} for t in targets}
    for source, spath in source_ckpts.items():
        sdelta, _ = _read(spath, expect_method, ref)
        for target in targets:
            if source == target:
                continue
            tuned, _ = _read(paths[target, source], expect_method, ref)
            out[target][source] = delta_distance(sdelta, tuned, where=f"{spath} vs {paths[target, source]}")
            del tuned
        del sdelta
    return {t: {s: out[t][s] for s in source_ckpts if s in out[t]} for t in targets}  # sources in given order


def read_tuned_scores(tuned_dir, targets, sources, which="best") -> dict:
    """``{target: {source: dev score}}`` of the short tunings, from ``{target}/{source}/result.json``:
    the best dev score during the tuning (``best``, the original's) or the score of the last delta."""
    key = {"best": "dev_score", "last": "last_dev_score"}.get(which)
    if key is None:
        raise E.EnsembleError(f"tuned_checkpoint must be best or last, not {which!r}")
    out = {}
    for target in targets:
        out[target] = {}
        for source in sources:
            if source == target:
                continue
            path = Path(tuned_dir) / target / source / "result.json"
            if not path.is_file():
                raise DataError(f"{path}: no such file (run tune_all_ckpt.py for target {target}, source {source})")
            try:
                score = float(json.loads(path.read_text())[key])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}: no {key} ({e})") from None
            out[target][source] = score
    return out


def performance_scores(tuned: dict, zero_shot: dict, targets, sources, where="zero-shot scores") -> dict:
    """``{target: {source: tuned - zero_shot}}`` for every target and every other source."""
    out = {}
    for target in targets:
        out[target] = {}
        for source in sources:
            if source == target:
                continue
            if source not in zero_shot.get(target, {}):
                raise DataError(f"{where}: no zero-shot score of source {source} on target {target} "
                                f"(run dev_all_ckpt.py for it)")
            out[target][source] = performance_gain(tuned[target][source], zero_shot[target][source])
    return out


# --------------------------------------------------------------------------- outputs

def format_similarity(scores: dict) -> str:
    """The original's similarity layout: a target-name line, then one ``source,score`` line per source."""
    lines = []
    for target, row in scores.items():
        lines.append(target)
        lines += [f"{source},{score!r}" for source, score in row.items()]
    return "\n".join(lines) + "\n"


def write_similarity(path, scores: dict, metric=None, **extra) -> Path:
    """Write ``scores`` to ``path``; with ``metric``, also ``scores.json`` beside it (the metric and
    its direction, as pewe.similarity writes them), so unit_model_others.py can reuse the file."""
    path = Path(path)
    atomic_write_text(path, format_similarity(scores))
    if metric is not None:
        meta = {"metric": metric, "higher_is_more_similar": E.metric_sign(metric) > 0, "files": [path.name], **extra}
        atomic_write_text(path.parent / "scores.json", json.dumps(meta, indent=1))
    return path


def check_temperature(tem):
    """Refuse a bad softmax temperature before any file is read or written."""
    if isinstance(tem, bool) or not (isinstance(tem, (int, float)) and math.isfinite(tem) and tem > 0):
        raise E.EnsembleError(f"temperature must be a positive finite number, not {tem!r}")


def write_ensemble_per_target(save_dir, weights: dict, checkpoints: dict, sources, *, method, expect_method=None,
                              scores=None, temperature=None, metric=None, **meta) -> list:
    """``pewe.ensemble.write_ensemble`` for deltas that differ per target: ``checkpoints`` is
    {target: {source: path}} (e.g. each source delta after the short tuning on that target, which the
    original's Performance script averages). Same outputs, same checks before anything is written."""
    sources = list(sources)
    for target, w in weights.items():
        unknown = [s for s in w if s not in checkpoints.get(target, {})]
        if unknown:
            raise E.EnsembleError(f"target {target}: no checkpoint for source(s) {', '.join(unknown)}")
    E.check_sources([checkpoints[t][s] for t, w in weights.items() for s in w], expect_method)
    save_dir = Path(save_dir)
    written = []
    for target, w in weights.items():
        paths = checkpoints[target]
        tensors, config = E.weighted_average([(paths[s], x) for s, x in w.items()], expect_method)
        path = save_dir / E.OUTPUT_PATTERN.format(task=target)
        save_delta(path, tensors, config, task=target, method=method, weights=w, temperature=temperature,
                   metric=metric, sources={s: str(Path(paths[s]).resolve()) for s in w}, **meta)
        written.append(path)
    title = method if metric is None else f"{metric}, T = {temperature:g}"
    E.write_weight_reports(save_dir, weights, sources, scores, title)
    return written

"""Weighted averages of source deltas, parameter by parameter, and the averaged-delta folder.

- ``weighted_average``: sum_s w_s * delta_s for one target (for LoRA A and B separately, as the
  paper), reading one source at a time;
- ``weighted_averages``: the same for many targets at once, reading each source once and adding it
  into every target's accumulator (N accumulators + one source in memory, within a byte budget);
- ``write_averages``: ``without_{target}_checkpoint.safetensors`` (+ .json: the weights, the sources
  and how the weights were made) for every target, which ``tune_hps_singletask.py --train_checkpoint
  DIR`` picks up; the sources may be the same for every target or differ per target (the
  Performance score averages each source delta after its short tuning on that target);
- ``write_merges``: the same files for an initialisation that merges the deltas by a rule of its own
  (``pewe.inits.InitSpec.combine``: TIES, DARE, the exact LoRA product) instead of summing them: a
  merge is not a running sum, so each target's sources are in memory at once (n deltas).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from delta_modules import DeltaError, check_compatible, read_delta, save_delta
from pewe.layout import init_path
from pewe.weights import EnsembleError

def _signature(tensors: dict) -> dict:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _check_same_config(ref, found, path, ref_path):
    try:
        check_compatible(ref, found, path)
    except DeltaError:  # its message speaks of "the model"; here the reference is another source
        raise DeltaError(f"{path}: delta config {found.fields()} differs from {ref_path}'s {ref.fields()}; "
                         f"deltas of different configs cannot be averaged") from None


def _check_same_tensors(ref: dict, found: dict, path, ref_path):
    if ref == found:
        return
    missing, extra = sorted(set(ref) - set(found)), sorted(set(found) - set(ref))
    if missing or extra:
        raise DeltaError(f"{path}: its tensors differ from {ref_path}'s (missing {missing[:3]}, extra {extra[:3]})")
    k = next(k for k in ref if ref[k] != found[k])
    raise DeltaError(f"{path}: {k} has shape {found[k]}, {ref_path} has {ref[k]}")


def _checked_sources(paths, expect_method=None):
    """Yield ``(tensors, config)`` of each source in turn (one in memory at a time), each checked
    against the first: same method (``expect_method`` if given), config fields, tensor names, shapes."""
    ref = None  # (path, config, {name: shape}) of the first source
    for path in paths:
        tensors, cfg, _ = read_delta(path)
        if expect_method is not None and cfg.method != expect_method:
            raise DeltaError(f"{path}: a {cfg.method} delta, but delta = {expect_method}")
        if ref is None:
            ref = (path, cfg, _signature(tensors))
        else:
            _check_same_config(ref[1], cfg, path, ref[0])
            _check_same_tensors(ref[2], _signature(tensors), path, ref[0])
        yield tensors, cfg
        del tensors  # the caller drops its reference too: the next source replaces this one


def weighted_average(paths_and_weights, expect_method=None):
    """``(tensors, config)`` with tensors[k] = sum_i w_i * delta_i[k], accumulated in float32.

    Streams over the sources: one source delta is in memory at a time, plus the accumulator.
    Weights need not sum to 1 but must be finite."""
    items = list(paths_and_weights)
    if not items:
        raise EnsembleError("no source deltas to average")
    for path, w in items:
        if not math.isfinite(float(w)):
            raise EnsembleError(f"{path}: weight {w} is not finite")
    acc = config = None
    weights = iter([float(w) for _, w in items])  # not zip(): its reused tuple would keep the last source alive
    for tensors, cfg in _checked_sources([p for p, _ in items], expect_method):
        w = next(weights)
        if acc is None:
            config = cfg
            # mul makes a fresh float32 tensor; with w = 1 it is the source bit for bit
            acc = {k: v.to(torch.float32) * w for k, v in tensors.items()}
        else:
            for k in acc:
                acc[k].add_(tensors[k].to(torch.float32), alpha=w)
        del tensors
    return acc, config


ACCUMULATOR_BYTES = 2 << 30  # float32 accumulators held at once by weighted_averages (2 GiB)


def _check_weights(target, w: dict, checkpoints: dict):
    if not w:
        raise EnsembleError(f"target {target}: no source deltas to average")
    unknown = [s for s in w if s not in checkpoints]
    if unknown:
        raise EnsembleError(f"target {target}: no checkpoint for source(s) {', '.join(unknown)}")
    for s, x in w.items():
        if not math.isfinite(float(x)):
            raise EnsembleError(f"{checkpoints[s]}: weight {x} is not finite")


def _flat32(tensors: dict, keys) -> torch.Tensor:
    """A delta's tensors, in ``keys`` order, as one float32 vector (P,): one add per target and
    source instead of one per tensor (an adapter on T5-base has 120 small tensors)."""
    return torch.cat([tensors[k].reshape(-1).to(torch.float32) for k in keys])


def _unflat(flat: torch.Tensor, shapes: dict) -> dict:
    """{name: tensor} of its own memory (cloned: safetensors refuses views of one shared buffer)."""
    sizes = [math.prod(s) for s in shapes.values()]
    return {k: part.view(shape).clone() for (k, shape), part in zip(shapes.items(), flat.split(sizes))}


def weighted_averages(weights: dict, checkpoints: dict, expect_method=None, max_bytes=ACCUMULATOR_BYTES):
    """Yield ``(target, tensors, config)`` for every target of ``weights`` ({target: {source: w}}),
    tensors[k] = sum_s w_s * delta_s[k] in float32, the sources taken in ``checkpoints`` order.

    Each source is read once and added into the accumulator of every target that uses it (the
    per-target ``weighted_average`` reads every source once per target: N^2 reads for N targets).
    Memory: the accumulators of as many targets as fit in ``max_bytes`` plus one source; when they do
    not all fit, the targets are done in groups and the sources read once per group. The first pass
    reads and checks every checkpoint given (even one no target uses) before anything is yielded, so
    a caller that writes as it goes writes nothing when a source is bad."""
    targets = list(weights)
    for t in targets:
        _check_weights(t, weights[t], checkpoints)
    start, config, shapes, per_pass = 0, None, None, len(targets)
    while start < len(targets):
        group = targets[start:start + per_pass]
        reads = list(checkpoints) if start == 0 else [s for s in checkpoints if any(s in weights[t] for t in group)]
        accs = {}  # {target: (P,) float32}, filled as the sources stream by
        i = 0  # not zip()/enumerate(): their reused tuple would keep the previous source alive during a read
        for tensors, cfg in _checked_sources([checkpoints[s] for s in reads], expect_method):
            s, i = reads[i], i + 1
            if config is None:  # the first source fixes the layout and how many accumulators fit
                config, shapes = cfg, {k: tuple(v.shape) for k, v in tensors.items()}
                per_pass = max(1, int(max_bytes // max(4 * sum(v.numel() for v in tensors.values()), 1)))
                group = targets[:per_pass]
            users = [t for t in group if s in weights[t]]
            flat = _flat32(tensors, shapes) if users else None
            del tensors
            for t in users:
                w = float(weights[t][s])
                if t in accs:
                    accs[t].add_(flat, alpha=w)
                else:  # mul makes a fresh tensor; with w = 1 it is the source bit for bit
                    accs[t] = flat * w
            del flat
        for t in group:
            yield t, _unflat(accs.pop(t), shapes), config
        start += len(group)


def read_sources(paths, expect_method=None):
    """``(list of {key: tensor}, config)`` of every source, all in memory, checked as ``check_sources``."""
    deltas, config = [], None
    for tensors, config in _checked_sources(paths, expect_method):
        deltas.append(tensors)
    return deltas, config


def check_sources(paths, expect_method=None):
    """Read every source once and refuse a mix of methods, configs or tensors, before anything is
    written; returns the common config."""
    config = None
    for _, config in _checked_sources(paths, expect_method):
        pass
    return config


def per_target(checkpoints: dict, weights: dict) -> dict:
    """``{target: {source: path}}`` from either that or ``{source: path}`` shared by every target."""
    if all(isinstance(v, dict) for v in checkpoints.values()):
        return checkpoints
    return {t: checkpoints for t in weights}


def averages(weights: dict, checkpoints: dict, expect_method=None, max_bytes=None):
    """Yield ``(target, tensors, config)`` for every target of ``weights``. ``checkpoints``:
    {source: path} shared by the targets (each source read once for all of them), or
    {target: {source: path}} (each target averaged on its own). Every source is checked first."""
    if not all(isinstance(v, dict) for v in checkpoints.values()):
        yield from weighted_averages(weights, checkpoints, expect_method, max_bytes or ACCUMULATOR_BYTES)
        return
    for target, w in weights.items():
        _check_weights(target, w, checkpoints.get(target, {}))
    check_sources([checkpoints[t][s] for t, w in weights.items() for s in w], expect_method)
    for target, w in weights.items():
        yield (target, *weighted_average([(checkpoints[target][s], x) for s, x in w.items()], expect_method))


def write_averages(save_dir, weights: dict, checkpoints: dict, meta, expect_method=None, max_bytes=None) -> list:
    """Average the sources for every target of ``weights`` and write ``without_{target}_checkpoint``
    files into ``save_dir``; ``meta``: the sidecar's fields (a dict, or a function of the target).
    Returns the written paths (nothing is written if a source is bad)."""
    used = per_target(checkpoints, weights)
    written = []
    for target, tensors, config in averages(weights, checkpoints, expect_method, max_bytes):
        path = init_path(save_dir, target)
        extra = meta(target) if callable(meta) else meta
        save_delta(path, tensors, config, task=target, weights=weights[target],
                   sources={s: str(Path(used[target][s]).resolve()) for s in weights[target]}, **extra)
        written.append(path)
    return written


def write_merges(save_dir, weights: dict, checkpoints: dict, meta, combine, rng_for, expect_method=None,
                 on_sources=None) -> list:
    """For every target of ``weights`` ({target: {source: w}}): read its sources, merge them with
    ``combine(deltas, weights, config, rng_for(target))`` and write ``without_{target}_checkpoint``
    (the sidecar: ``meta`` as in ``write_averages``, its ``compute_seconds`` plus the time of this
    reading and merging). ``on_sources(target, deltas, weights, config)`` may add sidecar fields
    computed from the loaded sources. Every source is checked before anything is written."""
    used = per_target(checkpoints, weights)
    for target, w in weights.items():
        _check_weights(target, w, used[target])
    check_sources([used[t][s] for t, w in weights.items() for s in w], expect_method)
    written = []
    for target, w in weights.items():
        start = time.perf_counter()
        names = list(w)
        deltas, config = read_sources([used[target][s] for s in names], expect_method)
        ws = [float(w[s]) for s in names]
        merged = combine(deltas, ws, config, rng_for(target))
        seconds = time.perf_counter() - start
        extra = dict(meta(target) if callable(meta) else meta)
        extra["compute_seconds"] = extra.get("compute_seconds", 0.0) + seconds
        if on_sources is not None:
            extra.update(on_sources(target, deltas, ws, config))
        del deltas
        path = init_path(save_dir, target)
        save_delta(path, merged, config, task=target, weights=w,
                   sources={s: str(Path(used[target][s]).resolve()) for s in w}, **extra)
        written.append(path)
    return written

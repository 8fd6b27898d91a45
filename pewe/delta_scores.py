"""Scores of a source delta for a target read from delta files, over whole (target, source) tables:
what ``unit_model/unit_model_{cos,Euclidean,Performance}.py`` and the study compute. The scores
themselves (Cosine, Euclidean, Performance) are declared in ``pewe.scores``.

Score matrices are ``{target: {source: score}}`` and stream over files: one source delta in memory at
a time (plus one target-side delta). They are written in the similarity ``result.tsv`` layout
(``pewe.layout.write_similarity``) so that ``unit_model_others.py`` can read them back.
"""
from __future__ import annotations

import json
from pathlib import Path

from delta_modules import DeltaError, check_compatible, read_delta
from pewe.data import DataError
from pewe.scores import ScoreError, delta_cosine, delta_distance, performance_gain

TUNED_CHECKPOINTS = ("best", "last")  # which delta of a short tuning: best by dev (the original's) or last


# --------------------------------------------------------------------------- score matrices

def pairs_of(targets, sources, skip_self=True) -> list:
    """(target, source) pairs, targets outer; a target's own source is skipped unless ``skip_self`` is off."""
    return [(t, s) for t in targets for s in sources if not (skip_self and s == t)]


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
        raise ScoreError(f"tuned_checkpoint must be best or last, not {which!r}")
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
        raise ScoreError(f"tuned_checkpoint must be best or last, not {which!r}")
    out = {t: {} for t in targets}
    for target, source in pairs_of(targets, sources):
        path = Path(tuned_dir) / target / source / "result.json"
        if not path.is_file():
            raise DataError(f"{path}: no such file (run tune_all_ckpt.py for target {target}, source {source})")
        try:
            out[target][source] = float(json.loads(path.read_text())[key])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: no {key} ({e})") from None
    return out


def performance_scores(tuned: dict, zero_shot: dict, targets, sources, where="zero-shot scores") -> dict:
    """``{target: {source: tuned - zero_shot}}`` for every target and every other source."""
    out = {t: {} for t in targets}
    for target, source in pairs_of(targets, sources):
        if source not in zero_shot.get(target, {}):
            raise DataError(f"{where}: no zero-shot score of source {source} on target {target} "
                            f"(run dev_all_ckpt.py for it)")
        out[target][source] = performance_gain(tuned[target][source], zero_shot[target][source])
    return out

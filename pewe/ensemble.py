"""What the ``unit_model/unit_model_*.py`` scripts share: their task and path options, and the
averaged-delta folder they write.

For a target task t and source deltas s != t the weights come from ``pewe.weights`` (softmax of a
score, plain average, manual groups), the averages from ``pewe.averaging``. ``write_ensemble`` writes
the folder, as the original's scripts do (safetensors instead of pickles):
``without_{task}_checkpoint.safetensors`` (+ ``.json``) per target, which ``tune_hps_singletask.py
--train_checkpoint DIR`` picks up; ``final_weight.txt``; a tidy ``weights.csv``; the heat map
``hot_pic_all.png``.
"""
from __future__ import annotations

from pathlib import Path

from delta_modules import METHODS, DeltaError
from pewe.averaging import write_averages
from pewe.data import DataError
from pewe.layout import source_checkpoints, write_similarity
from pewe.scores import score_spec
from pewe.weight_reports import weights_title, write_weight_reports
from pewe.weights import EnsembleError

__all__ = ["EnsembleError", "check_delta_name", "fill_path", "select_pool", "select_targets",
           "write_ensemble", "write_score_file", "summary_line", "report_written"]


def check_delta_name(delta):
    if delta not in METHODS:
        raise DeltaError(f"unknown delta {delta!r}; expected one of {', '.join(METHODS)}")


def fill_path(template, **fields) -> Path:
    """A default path with ``{delta}``-style placeholders filled in (only the given names)."""
    text = str(template)
    for k, v in fields.items():
        text = text.replace("{" + k + "}", str(v))
    return Path(text)


def select_pool(source_dir, names=(), task_list=()) -> dict:
    """{source: delta} of the pool: the named sources (each must have its delta), or every delta of
    ``source_dir``; ``task_list`` (the original's TASK_LIST) restricts it."""
    pool = source_checkpoints(source_dir, [str(n) for n in names])
    if task_list:
        pool = {s: p for s, p in pool.items() if s in {str(t) for t in task_list}}
    if not pool:
        raise DeltaError(f"{source_dir}: no source delta left in the pool (task_list {list(task_list)})")
    return pool


def select_targets(names, default, task_list=(), where="targets") -> list:
    """The named targets, or else ``default`` (the similarity file's targets, or the pool itself for
    the original's leave-one-out); ``task_list`` (the original's TASK_LIST) restricts them."""
    targets = [str(t) for t in names] or [str(t) for t in default]
    if task_list:
        targets = [t for t in targets if t in {str(x) for x in task_list}]
    if not targets:
        raise DataError(f"{where}: no target left (task_list {list(task_list)})")
    return targets


def write_ensemble(save_dir, weights: dict, checkpoints: dict, *, method, sources=None, expect_method=None,
                   scores=None, temperature=None, metric=None, **meta) -> list:
    """Average the sources for every target of ``weights`` and write the whole folder.

    ``weights``: {target: {source: w}}; ``checkpoints``: {source: path}, in source order (the column
    order of the heat map and final_weight.txt), or {target: {source: path}} when the averaged deltas
    differ per target (then ``sources`` gives the column order). Returns the written delta paths
    (nothing is written if a source is bad)."""
    sources = list(checkpoints) if sources is None else list(sources)
    written = write_averages(save_dir, weights, checkpoints, expect_method=expect_method,
                             meta={"method": method, "temperature": temperature, "metric": metric, **meta})
    write_weight_reports(save_dir, weights, sources, scores, weights_title(method, metric, temperature))
    return written


def write_score_file(out_dir, scores: dict, metric, **extra) -> Path:
    """A score matrix the unit_model scripts computed from delta files (Cosine, Euclidean,
    Performance): ``out_dir/result.tsv`` in the similarity layout with its scores.json, so
    unit_model_others.py can reuse it. Returns the result.tsv path."""
    spec = score_spec(metric)
    return write_similarity(out_dir, spec.name, {"": scores}, higher_is_more_similar=spec.higher_is_more_similar,
                            reduction=spec.reduction, **extra)[0]


def summary_line(target, w, top=3) -> str:
    best = sorted(w.items(), key=lambda kv: -kv[1])[:top]
    return f"  {target}: " + ", ".join(f"{s} {x:.3f}" for s, x in best)


def report_written(save_dir, weights: dict, headline: str):
    """What every unit_model script prints when it is done."""
    print(headline)
    for target, w in weights.items():
        print(summary_line(target, w))
    print(f"wrote {save_dir}/without_{{task}}_checkpoint.safetensors, final_weight.txt, weights.csv, hot_pic_all.png")
    print(f"tune from them: python tune_hps_singletask.py --do_train --train_checkpoint {save_dir} ...")

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
from pewe.data import DataError, list_tasks
from pewe.layout import SOURCE_PATTERN, has_source_delta, source_checkpoints, write_similarity
from pewe.scores import score_spec
from pewe.weight_reports import weights_title, write_weight_reports
from pewe.weights import EnsembleError

__all__ = ["EnsembleError", "check_delta_name", "fill_path", "find_tasks", "source_checkpoints", "write_ensemble",
           "write_score_file", "summary_line"]


def check_delta_name(delta):
    if delta not in METHODS:
        raise DeltaError(f"unknown delta {delta!r}; expected one of {', '.join(METHODS)}")


def fill_path(template, **fields) -> Path:
    """A default path with ``{delta}``-style placeholders filled in (only the given names)."""
    text = str(template)
    for k, v in fields.items():
        text = text.replace("{" + k + "}", str(v))
    return Path(text)


def find_tasks(origin_data_path, source_ckpt_path, task_list=()) -> list:
    """``task_list`` (each must be a task folder of ``origin_data_path``), or else every task folder
    of ``origin_data_path`` that has a source checkpoint (ours or a peft adapter folder)."""
    folders = list_tasks(origin_data_path)
    if task_list:
        tasks = [str(t) for t in task_list]
        missing = [t for t in tasks if t not in folders]
        if missing:
            raise DataError(f"{origin_data_path}: no task folder(s) {', '.join(missing)}")
        if len(set(tasks)) != len(tasks):
            raise EnsembleError(f"task_list names a task twice: {tasks}")
        return tasks
    tasks = [t for t in folders if has_source_delta(Path(source_ckpt_path) / t)]
    if len(tasks) < 2:
        raise DeltaError(f"{source_ckpt_path}: found source checkpoints ({{task}}/{SOURCE_PATTERN} or peft folders) "
                         f"for {len(tasks)} of the {len(folders)} tasks of {origin_data_path}; need at least 2")
    return tasks


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

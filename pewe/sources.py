"""Source deltas made elsewhere and used here: the checks that they fit the run (the delta config, and
the backbone they were tuned on), and the shipped sources of the embedded backbone (data/sources).

Every checkpoint this project writes records the fingerprint of its backbone (``base_model_sha256``,
``pewe.model.model_fingerprint``); a source whose fingerprint differs from the run's model, or whose
delta config differs from the run's, is refused with one line naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path

from delta_modules import DeltaError, check_compatible, read_delta, save_delta
from pewe.atomic import atomic_write_text
from pewe.data import first_prefix, read_tsv, split_path
from pewe.layout import file_sha256, read_json
from pewe.metrics import evaluate, majority_answer, metric_for
from pewe.model import REPO, load_backbone, model_fingerprint, resolve_precision, tokenizer_fingerprint
from pewe.pretrain import task_scores

SHIPPED = REPO / "data" / "sources"  # data/sources/{method}/{task}/


def check_sources_fit(sources: dict, config=None, model=None, what="source delta"):
    """Every delta of ``sources`` ({name: path}) must have ``config``'s shape fields and, where it
    records its backbone, have been tuned on ``model``: checked before any work."""
    fingerprint = model_fingerprint(model) if model is not None else None
    for path in sources.values():
        _, found, meta = read_delta(path)
        if config is not None:
            check_compatible(config, found, path, against="this run's")
        made_on = meta.get("base_model_sha256")
        if fingerprint is not None and made_on is not None and made_on != fingerprint:
            raise DeltaError(f"{path}: this {what} was tuned on another backbone ({meta.get('base_model', '?')}, "
                             f"fingerprint {made_on[:12]}) than this run's model (fingerprint {fingerprint[:12]})")


def repo_relative(path) -> str:
    """A path inside the repository as it is written from its root (shipped files name no machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def majority_score(task_dir, task) -> dict:
    """The "always give the most frequent answer" score of ``task``'s test split."""
    answers = [ex.answers for ex in read_tsv(split_path(task_dir, task, first_prefix(task_dir, task), "test"))]
    answer = majority_answer(answers)
    metric = metric_for(task)
    return {"answer": answer, "metric": metric, "score": evaluate([answer] * len(answers), answers, metric)}


def ship_sources(work_dir: Path, out_dir: Path, methods, tasks, model_path, task_dir=None,
                 max_input_length=512) -> dict:
    """Copy every finished source run of the study folder ``work_dir`` into ``out_dir/{method}/{task}/``
    (with its backbone's fingerprint and scores) and write ``out_dir/sources.json``, which also gives
    each task's majority-answer score and the bare backbone's own test score (what a delta has to add
    to). A shipped file already equal to its run's best delta is left as it is; an index written on
    another backbone is replaced, not merged. Returns {method: {task: entry}}."""
    model, tokenizer = load_backbone(model_path, model_path)
    fingerprint, tok_fingerprint = model_fingerprint(model), tokenizer_fingerprint(tokenizer)
    task_dir = Path(task_dir) if task_dir else Path(model_path).resolve().parent / "full"
    index = out_dir / "sources.json"
    old = read_json(index, "sources index") if index.is_file() else {}
    if old.get("base_model_sha256") != fingerprint:  # an index of another backbone: none of its scores hold here
        old = {}
    table, bare = old.get("sources", {}), old.get("backbone_test", {})
    todo = [t for t in tasks if t not in bare and any((work_dir / m / "sources" / t).is_dir() for m in methods)]
    if todo:  # the bare backbone's greedy test score: a delta that only matches it has learned nothing
        tests = {t: read_tsv(split_path(task_dir, t, first_prefix(task_dir, t), "test")) for t in todo}
        device = next(model.parameters()).device
        bare.update({t: score for t, (_, score) in task_scores(model, tokenizer, tests, device,
                                                               resolve_precision("auto", device),
                                                               max_input_length=max_input_length).items()})
    for method in methods:
        for task in tasks:
            src = work_dir / method / "sources" / task / "checkpoint-best.safetensors"
            if not src.is_file():
                continue
            tensors, config, meta = read_delta(src)
            run = read_json(src.parent / "runs" / meta["run"] / "result.json", "run result")
            dst = out_dir / method / task / "checkpoint-best.safetensors"
            entry = {"dev": run["dev_score"], "test": run["test_score"], "best_step": run["best_step"],
                     "updates": run["updates"], "majority": majority_score(task_dir, task), "backbone": bare[task]}
            if not (dst.is_file() and file_sha256(dst) == file_sha256(src)):
                save_delta(dst, tensors, config, **{**meta, "base_model": repo_relative(model_path),
                                                    "base_model_sha256": fingerprint,
                                                    "tokenizer_sha256": tok_fingerprint,
                                                    "test_score": run["test_score"], "updates": run["updates"]})
            table.setdefault(method, {})[task] = entry
    atomic_write_text(index, json.dumps({"backbone": repo_relative(model_path), "base_model_sha256": fingerprint,
                                         "backbone_test": bare, "sources": table}, indent=1, sort_keys=True))
    return table

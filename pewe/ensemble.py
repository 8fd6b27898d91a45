"""Weighted ensembling of source deltas: similarity scores -> leave-one-out weights -> averaged deltas.

What ``unit_model/unit_model_*.py`` run. For a target task t and source deltas s != t:

- ``loo_weights``: w_s = softmax(sign * score(s, t) / T) over the other sources, where ``sign`` is the
  metric's direction (``METRIC_SIGN``; the original negated every score, which inverts the metrics
  where higher means more similar);
- ``average_weights`` / ``group_weights``: the baselines, a plain average of all other sources or of the
  other members of a hand-made group;
- ``weighted_average``: sum_s w_s * delta_s, parameter by parameter (for LoRA A and B separately),
  reading one source at a time;
- ``weighted_averages``: the same for many targets at once, reading each source once and adding it
  into every target's accumulator (N accumulators + one source in memory, within a byte budget).

Outputs of ``write_ensemble`` (in ``save_ckpt_path``, as the original's, with safetensors instead of
pickles): ``without_{task}_checkpoint.safetensors`` (+ ``.json``) per target, which
``tune_hps_singletask.py --train_checkpoint DIR`` picks up; ``final_weight.txt``; a tidy
``weights.csv``; the heat map ``hot_pic_all.png``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from delta_modules import METHODS, DeltaError, check_compatible, find_checkpoint, read_delta, save_delta
from pewe.errors import UserError
from pewe.similarity import SCORES
from pewe.atomic import atomic_write_bytes, atomic_write_text
from pewe.data import DataError, list_tasks

# +1: a higher score means a closer source; -1: a lower score does (losses, distances).
# Each data-based score (pewe.similarity) declares its own direction; the weight-based scores of the
# unit_model scripts are here. The original negated every score, which inverted the cosine of logits
# and labels; GraNd keeps the original's "lower = closer".
WEIGHT_SCORE_SIGN = {
    "Cosine": +1,  # cosine of the weights to a target-tuned delta
    "Euclidean": -1,  # distance moved by the source delta when tuned on the target
    "Performance": +1,  # dev gain of the source delta after a short tuning on the target
}
METRIC_SIGN = {**{name: (1 if spec.higher_is_more_similar else -1) for name, spec in SCORES.items()},
               **WEIGHT_SCORE_SIGN}
_ALIASES = {"kl_divergence": "KL", "cosine_of_logits_and_labels": "Cosine_of_Logits_and_Labels",
            "cos": "Cosine", "perf": "Performance"}

OUTPUT_PATTERN = "without_{task}_checkpoint.safetensors"


class EnsembleError(UserError):
    """Weights that cannot be computed from the given scores, groups or options."""


# --------------------------------------------------------------------------- scores and weights

def metric_sign(metric: str) -> int:
    """The sign of ``metric`` (case, spaces and dashes ignored: "KL-divergence" is KL)."""
    key = re.sub(r"[\s\-]+", "_", str(metric).strip()).lower()
    by_key = {k.lower(): k for k in METRIC_SIGN}
    name = by_key.get(key) or _ALIASES.get(key)
    if name is None:
        raise EnsembleError(f"unknown metric {metric!r}; expected one of {', '.join(METRIC_SIGN)}")
    return METRIC_SIGN[name]


def file_sign(sim_path, metric: str) -> int:
    """The sign for a similarity file: its ``scores.json`` (written beside it by pewe.similarity) when
    there is one, checked against ``metric``; else the sign of ``metric``."""
    sign = metric_sign(metric)
    meta = Path(sim_path).parent / "scores.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        found = 1 if info["higher_is_more_similar"] else -1
        if found != sign:
            raise EnsembleError(f"{meta}: the scores are {info['metric']} (higher is "
                                f"{'more' if found > 0 else 'less'} similar), but metric = {metric}")
    return sign


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_similarity(path) -> dict:
    """``{target: {source: score}}`` from a similarity ``result.tsv`` in the original's layout: a line
    with the target's name, then one ``source,score`` line per source (comma-separated)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such similarity file")
    scores, target, target_line = {}, None, 0
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            if "," not in line:  # a target-name line opens a block
                if re.search(r"\s", line) or _is_number(line):
                    raise DataError(f"{path}:{lineno}: expected a target name or 'source,score', got {line!r} "
                                    f"(layout: a target-name line, then its source,score lines)")
                if target is not None and not scores[target]:
                    raise DataError(f"{path}:{target_line}: target {target} has no source,score lines")
                if line in scores:
                    raise DataError(f"{path}:{lineno}: target {line} appears twice")
                target, target_line = line, lineno
                scores[target] = {}
                continue
            fields = [x.strip() for x in line.split(",")]
            if len(fields) != 2 or not fields[0]:
                raise DataError(f"{path}:{lineno}: expected 'source,score', got {line!r}")
            if target is None:
                raise DataError(f"{path}:{lineno}: a source,score line before any target-name line")
            source, text = fields
            try:
                score = float(text)
            except ValueError:
                raise DataError(f"{path}:{lineno}: score {text!r} of source {source} is not a number") from None
            if not math.isfinite(score):
                raise DataError(f"{path}:{lineno}: score of source {source} for target {target} is {text}")
            if source in scores[target]:
                raise DataError(f"{path}:{lineno}: source {source} appears twice for target {target}")
            scores[target][source] = score
    if target is None:
        raise DataError(f"{path}: no similarity scores (empty file)")
    if not scores[target]:
        raise DataError(f"{path}:{target_line}: target {target} has no source,score lines")
    return scores


def loo_weights(scores: dict, sources, sign: int, temperature: float, targets=None, where="scores") -> dict:
    """``{target: {source: weight}}``: softmax(sign * score / T) over the sources other than the target.

    ``targets`` defaults to every target of ``scores``; ``where`` names the scores in messages."""
    if sign not in (1, -1):
        raise EnsembleError(f"sign must be +1 or -1, not {sign!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise EnsembleError(f"temperature must be a positive finite number, not {temperature!r}")
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


def group_weights(groups, sources=None) -> dict:
    """The manual division: each target of a group gets the plain average of the other members."""
    groups = parse_groups(groups)
    seen, out = {}, {}
    for i, group in enumerate(groups):
        if len(group) < 2:
            raise EnsembleError(f"group {i + 1} {group}: needs at least two tasks")
        for task in group:
            if task in seen:
                raise EnsembleError(f"task {task} is in group {seen[task] + 1} and in group {i + 1}")
            if sources is not None and task not in sources:
                raise EnsembleError(f"group {i + 1}: task {task} is not among the sources")
            seen[task] = i
        for target in group:
            out[target] = {s: 1.0 / (len(group) - 1) for s in group if s != target}
    return out


# --------------------------------------------------------------------------- averaging

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


def write_averages(save_dir, weights: dict, checkpoints: dict, *, method, expect_method=None, temperature=None,
                   metric=None, max_bytes=ACCUMULATOR_BYTES, **meta) -> list:
    """``without_{target}_checkpoint.safetensors`` (+ .json) for every target of ``weights`` from
    ``weighted_averages``; returns the written paths (nothing is written if a source is bad)."""
    save_dir = Path(save_dir)
    written = []
    for target, tensors, config in weighted_averages(weights, checkpoints, expect_method, max_bytes):
        w = weights[target]
        path = save_dir / OUTPUT_PATTERN.format(task=target)
        save_delta(path, tensors, config, task=target, method=method, weights=w, temperature=temperature,
                   metric=metric, sources={s: str(Path(checkpoints[s]).resolve()) for s in w}, **meta)
        written.append(path)
    return written


def check_sources(paths, expect_method=None):
    """Read every source once and refuse a mix of methods, configs or tensors, before anything is
    written; returns the common config."""
    config = None
    for _, config in _checked_sources(paths, expect_method):
        pass
    return config


# --------------------------------------------------------------------------- tasks and checkpoints

def source_checkpoints(source_ckpt_path, tasks) -> dict:
    """``{task: path}`` of ``{source_ckpt_path}/{task}/checkpoint-best*.safetensors``."""
    return {t: find_checkpoint(Path(source_ckpt_path) / t) for t in tasks}


def find_tasks(origin_data_path, source_ckpt_path, task_list=()) -> list:
    """``task_list`` (each must be a task folder of ``origin_data_path``), or else every task folder
    of ``origin_data_path`` that has a source checkpoint."""
    folders = list_tasks(origin_data_path)
    if task_list:
        tasks = [str(t) for t in task_list]
        missing = [t for t in tasks if t not in folders]
        if missing:
            raise DataError(f"{origin_data_path}: no task folder(s) {', '.join(missing)}")
        if len(set(tasks)) != len(tasks):
            raise EnsembleError(f"task_list names a task twice: {tasks}")
        return tasks
    tasks = [t for t in folders if any((Path(source_ckpt_path) / t).glob("checkpoint-best*.safetensors"))]
    if len(tasks) < 2:
        raise DeltaError(f"{source_ckpt_path}: found source checkpoints ({{task}}/checkpoint-best*.safetensors) "
                         f"for {len(tasks)} of the {len(folders)} tasks of {origin_data_path}; need at least 2")
    return tasks


# --------------------------------------------------------------------------- outputs

def _others(target, sources):
    return [s for s in sources if s != target]


def write_final_weight(path, weights: dict, sources):
    """The original's ``final_weight.txt``: per target a line with its name, then a line with the
    list of its weights over the other sources, in source order (0 for a source not used)."""
    lines = []
    for target, w in weights.items():
        lines += [target, str([w.get(s, 0.0) for s in _others(target, sources)])]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_weights_csv(path, weights: dict, sources, scores=None):
    """``target,source,weight,score``, one row per (target, other source); score empty if none."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["target", "source", "weight", "score"])
    for target, w in weights.items():
        for s in _others(target, sources):
            score = (scores or {}).get(target, {}).get(s)
            out.writerow([target, s, repr(w.get(s, 0.0)), "" if score is None else repr(score)])
    atomic_write_text(path, buf.getvalue())


def weight_matrix(weights: dict, sources) -> np.ndarray:
    """(n_targets, n_sources) weights, NaN where the source is the target itself (left out)."""
    m = np.zeros((len(weights), len(sources)))
    for i, (target, w) in enumerate(weights.items()):
        for j, s in enumerate(sources):
            m[i, j] = np.nan if s == target else w.get(s, 0.0)
    return m


def plot_heat_map(path, weights: dict, sources, title=""):
    """Target x source heat map (coolwarm, left-out diagonal blank); sizes scale with the task count."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = weight_matrix(weights, sources)
    rows, cols = m.shape
    font = float(np.clip(11 - max(rows, cols) / 8, 5, 10))  # 10 pt for a few tasks, 6 pt near 40
    cell = 1.7 * font / 72  # inches per cell: room for one tick label
    label = 0.55 * font / 72 * max(len(t) for t in [*weights, *sources])  # longest tick label, inches
    fig = Figure(figsize=(max(4.0, cols * cell + label + 1.6), max(3.5, rows * cell + label + 0.9)),
                 dpi=150 if max(rows, cols) <= 30 else 200, layout="constrained")  # small fonts need pixels
    FigureCanvasAgg(fig)  # attaches an Agg canvas: no pyplot, no global backend change
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["coolwarm"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(cols), labels=list(sources), fontsize=font, rotation=80, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(range(rows), labels=list(weights), fontsize=font)
    ax.set_xlabel("source delta", fontsize=font + 1)
    ax.set_ylabel("target task", fontsize=font + 1)
    if title:
        ax.set_title(title, fontsize=font + 1)
    bar = fig.colorbar(im, ax=ax)
    bar.ax.tick_params(labelsize=font)
    bar.set_label("weight", fontsize=font + 1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def write_ensemble(save_dir, weights: dict, checkpoints: dict, *, method, expect_method=None, scores=None,
                   temperature=None, metric=None, **meta) -> list:
    """Average the sources for every target of ``weights`` and write all outputs to ``save_dir``.

    ``weights``: {target: {source: w}}; ``checkpoints``: {source: path}, in source order (the
    column order of the heat map and final_weight.txt). Returns the written delta paths."""
    sources = list(checkpoints)
    save_dir = Path(save_dir)
    written = write_averages(save_dir, weights, checkpoints, method=method, expect_method=expect_method,
                             temperature=temperature, metric=metric, **meta)
    title = method if metric is None else f"{metric}, T = {temperature:g}"
    write_weight_reports(save_dir, weights, sources, scores, title)
    return written


def write_weight_reports(save_dir, weights: dict, sources, scores=None, title=""):
    """The files a user reads beside the averaged deltas: final_weight.txt, weights.csv, hot_pic_all.png."""
    save_dir = Path(save_dir)
    write_final_weight(save_dir / "final_weight.txt", weights, sources)
    write_weights_csv(save_dir / "weights.csv", weights, sources, scores)
    plot_heat_map(save_dir / "hot_pic_all.png", weights, sources, title=title)


# --------------------------------------------------------------------------- entry-script helpers

def check_delta_name(delta):
    if delta not in METHODS:
        raise DeltaError(f"unknown delta {delta!r}; expected one of {', '.join(METHODS)}")


def fill_path(template, **fields) -> Path:
    """A default path with ``{delta}``-style placeholders filled in (only the given names)."""
    text = str(template)
    for k, v in fields.items():
        text = text.replace("{" + k + "}", str(v))
    return Path(text)


def similarity_files(sim_path) -> list:
    """``[(path, out_subfolder)]``: one result.tsv (no subfolder), or each ``*_result.tsv`` of a
    folder (block / layer files) with its file stem as subfolder."""
    sim_path = Path(sim_path)
    if sim_path.is_file():
        return [(sim_path, None)]
    if sim_path.is_dir():
        natural = lambda f: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", f.name)]  # block_2 < block_10
        files = sorted(sim_path.glob("*_result.tsv"), key=natural)
        if not files:
            raise DataError(f"{sim_path}: a folder without *_result.tsv similarity files")
        return [(f, f.stem) for f in files]
    raise DataError(f"{sim_path}: no such similarity file or folder")


def summary_line(target, w, top=3) -> str:
    best = sorted(w.items(), key=lambda kv: -kv[1])[:top]
    return f"  {target}: " + ", ".join(f"{s} {x:.3f}" for s, x in best)



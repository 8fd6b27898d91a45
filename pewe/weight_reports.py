"""The files a reader looks at beside averaged deltas: ``final_weight.txt`` (the original's),
``weights.csv`` (tidy: target, source, weight, score) and the heat map ``hot_pic_all.png``
(targets as rows, sources as columns, coolwarm, each target's own source blank)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from pewe.atomic import atomic_write_bytes, atomic_write_text


def weights_title(method, metric=None, temperature=None) -> str:
    """The heat map's title: how the weights were made."""
    return method if metric is None else f"{metric}, T = {temperature:g}"


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
    lowest = float(np.nanmin(m)) if np.isfinite(m).any() else 0.0
    # softmax weights are >= 0 (blue = 0); a search such as LoraHub's may give negative ones: centre on 0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=lowest, vmax=max(float(np.nanmax(m)), 1e-12)) if lowest < 0 else None
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, norm=norm, vmin=None if norm else 0.0, aspect="auto",
                   interpolation="nearest")
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


def write_weight_reports(save_dir, weights: dict, sources, scores=None, title=""):
    """The files a user reads beside the averaged deltas: final_weight.txt, weights.csv, hot_pic_all.png."""
    save_dir = Path(save_dir)
    write_final_weight(save_dir / "final_weight.txt", weights, sources)
    write_weights_csv(save_dir / "weights.csv", weights, sources, scores)
    plot_heat_map(save_dir / "hot_pic_all.png", weights, sources, title=title)

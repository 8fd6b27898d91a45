"""The report's opening: the answer in numbers, and gain.png.

For each method and initialisation: the paired test gain over random init and over the plain average,
across (target, seed) pairs, with a 95 % bootstrap interval (targets resampled, seeds kept paired;
``pewe.stats``) and win / tie / loss counts, for the planted targets (``task_list.PLANTED``: a
rewritten copy of a source, the positive control) and the real targets apart; for each score's
initialisation, the mean weight it puts on a planted target's sibling; and a plain sentence of which
initialisations beat random init with the interval above zero.
"""
from __future__ import annotations

import io
import statistics

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pewe.atomic import atomic_write_bytes
from pewe.stats import paired_gain
from pewe.study.plan import StudyPlan
from task_list import PLANTED

GROUPS = ("planted", "real")


def target_groups(p: StudyPlan) -> dict:
    """{"planted": [...], "real": [...]} over the study's targets (a group may be empty)."""
    return {"planted": [t for t in p.all_targets if t in PLANTED],
            "real": [t for t in p.all_targets if t not in PLANTED]}


def points(x) -> str:
    return "—" if x is None else f"{100 * x:+.2f}"


def interval(g) -> str:
    return "—" if g.mean is None else f"{points(g.mean)} [{points(g.low)}, {points(g.high)}]"


def gains_of(p: StudyPlan, table, method, groups) -> dict:
    """{(init, base, group): PairedGain} over the test scores of one method."""
    out = {}
    for init in p.init_names:
        for base in ("random", "average"):
            if base == init or (base == "average" and "average" not in p.init_names):
                continue
            for group, targets in groups.items():
                out[init, base, group] = paired_gain(table, init, base, targets, p.seeds)
    return out


def sibling_weight(p: StudyPlan, weights_of, method, planted) -> dict:
    """{init: mean weight on the planted targets' siblings} of every initialisation with weights."""
    out = {}
    for init in p.init_names:
        weights = weights_of(p, method, init)
        got = [weights[t].get(PLANTED[t], 0.0) for t in planted if t in weights]
        if got:
            out[init] = statistics.fmean(got)
    return out


def answer_lines(p: StudyPlan, tables: dict, weights_of) -> list:
    """The report's first section. ``tables``: {method: {(init, target): {seed: test score}}};
    ``weights_of(plan, method, init)``: {target: {source: weight}}."""
    groups = target_groups(p)
    present = [g for g in GROUPS if groups[g]]
    lines = ["## The answer", "",
             "Test gain in points (score × 100), paired over (target, seed); mean over targets of each target's "
             "mean gain, [95 % bootstrap interval, targets resampled, seeds kept paired]; W/T/L: (target, seed) "
             "pairs won, tied, lost. " + ", ".join(f"{g}: {len(groups[g])} target(s)" for g in present) + ".", ""]
    verdicts = []
    for method in p.methods:
        g = gains_of(p, tables[method], method, groups)
        header = ["init"] + [h for grp in present for h in (f"{grp}: over random", "W/T/L",
                                                            *((f"{grp}: over average",) if "average" in p.init_names
                                                              else ()))]
        body = []
        for init in p.init_names:
            row = [init]
            for grp in present:
                r = g[init, "random", grp]
                # "—": no (target, seed) pair, e.g. manual on planted targets, which are in no group
                row += [interval(r), f"{r.wins}/{r.ties}/{r.losses}" if r.mean is not None else "—"]
                if "average" in p.init_names:
                    row.append(interval(g[init, "average", grp]) if init != "average" else "—")
            body.append(row)
        lines += [f"**{method}**", "", *md_table(header, body), ""]
        for grp in present:
            above = [i for i in p.init_names if g[i, "random", grp].above_zero]
            below = [i for i in p.init_names if g[i, "random", grp].below_zero]
            rest = [i for i in p.init_names if i not in above and i not in below and g[i, "random", grp].mean is not None]
            verdicts.append(f"- {method}, {grp} targets: beats random init with the interval above zero: "
                            f"{', '.join(above) or 'none'}; interval around zero (no significant gain): "
                            f"{', '.join(rest) or 'none'}" + (f"; below zero: {', '.join(below)}" if below else "") + ".")
        if groups["planted"]:
            sib = sibling_weight(p, weights_of, method, groups["planted"])
            if sib:
                lines += [f"Mean weight on the planted target's sibling ({method}): "
                          + ", ".join(f"{i} {w:.3f}" for i, w in sib.items())
                          + f" (uniform over the pool: {1 / len(p.tasks):.3f}).", ""]
    return lines + verdicts + [""]


def md_table(header, body) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


def plot_gain(path, p: StudyPlan, tables: dict):
    """One panel per target group (planted, real): each initialisation's mean test gain over random
    init with its 95 % interval, the methods side by side. Sized for a page width (8 in at 150 dpi)."""
    groups = {g: t for g, t in target_groups(p).items() if t}
    inits = p.init_names
    fig = Figure(figsize=(8.0, max(2.6, 0.42 * len(inits) * max(1, len(p.methods)) / 1.6 + 1.4)), dpi=150,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    height = 0.8 / max(1, len(p.methods))
    for ax, (group, targets) in zip(axes, groups.items()):
        for k, method in enumerate(p.methods):
            stats = [paired_gain(tables[method], i, "random", targets, p.seeds) for i in inits]
            y = np.arange(len(inits)) + (k - (len(p.methods) - 1) / 2) * height
            mean = np.array([np.nan if s.mean is None else 100 * s.mean for s in stats])
            low = np.array([0 if s.mean is None else 100 * (s.mean - s.low) for s in stats])
            high = np.array([0 if s.mean is None else 100 * (s.high - s.mean) for s in stats])
            ax.barh(y, mean, height, xerr=[low, high], capsize=2, label=method, alpha=0.85)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"{group} targets ({len(targets)}), {len(p.seeds)} seeds", fontsize=10)
        ax.set_xlabel("test gain over random init (points, 95 % interval)", fontsize=9)
        ax.tick_params(labelsize=9)
        ax.grid(axis="x", linewidth=0.3)
    axes[0].set_yticks(range(len(inits)), labels=inits)
    axes[0].invert_yaxis()
    # Below the panels, not inside: inside, it covered the ends of the longest intervals.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(p.methods), fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())

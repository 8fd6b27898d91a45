"""Step ``report``: report.md, report.csv, gain.png and heatmaps/, rebuilt from the files alone (any
process, any time); it first rebuilds the files that gather all targets, which shards running at the
same time may each have written before the others finished.

Choices shown in the report: one data split per task (the first ``{task}_{k}_{seed}`` prefix); seeds
vary the delta's random init, the data order and dropout; one learning rate and batch size (the
paper's 5e-4, 8). ``manual``: groups are ``task_list.BUNDLED_GROUPS`` and the paper's ``QA_groups`` restricted to the study tasks
(``task_list.groups_for``); a target left alone in its group gets no manual initialisation (its cell
is "—"): falling back to the average of all would repeat the ``average`` row under another name. The
dev score is recorded at each step budget; the test score only after early stopping (scoring test at
the budgets would need a hook in the trainer). A budget beyond the update at which a run stopped has
no score (blank in report.csv, "—" in tables).
"""
from __future__ import annotations

import csv
import io
import math
import shutil
import statistics
from collections import Counter
from pathlib import Path

from pewe.atomic import atomic_write_text
from pewe.data import first_prefix, read_tsv, split_path
from pewe.layout import read_json, rebuild_result_tsv, run_name
from pewe.metrics import evaluate, majority_answer, metric_for
from pewe.inits import init_spec
from pewe.scores import score_spec, temperature_text
from pewe.study.answer import answer_lines, md_table, plot_gain
from pewe.study.ensemble import read_init_sidecars, read_init_weights, write_init_summary
from pewe.study.plan import StudyPlan
from pewe.study.similarity import write_similarity_files
from pewe.weights import effective_sources

FLAG_SHARE = 0.5  # a test set whose most frequent answer exceeds this share is flagged
EARLY = "early_stop"  # the budget name of the early-stopped best delta in report.csv


def majority_baseline(task_dir, task) -> dict:
    """The "always give the most frequent answer" score of ``task``'s test split, and that answer's share."""
    examples = read_tsv(split_path(task_dir, task, first_prefix(task_dir, task), "test"))
    answers = [ex.answers for ex in examples]
    answer = majority_answer(answers)
    share = Counter(a[0] for a in answers)[answer] / len(answers)
    metric = metric_for(task)
    return {"task": task, "metric": metric, "answer": answer, "share": share, "n": len(answers),
            "score": evaluate([answer] * len(answers), answers, metric), "flagged": share > FLAG_SHARE}


def collect(p: StudyPlan) -> list:
    """Tidy rows (method, init, target, seed, budget, split, score) of every finished run."""
    rows = []
    for method in p.methods:
        for init in p.all_inits:
            for seed in p.seeds:
                for target in p.all_targets:
                    done = (p.tuned_dir(method, init, seed) / target / "runs"
                            / run_name(first_prefix(p.target_task_dir, target), p.learning_rate, p.batch_size)
                            / "result.json")
                    if not done.is_file():
                        continue
                    r = read_json(done, "run result")
                    key = (method, init, target, seed)
                    rows.append((*key, EARLY, "test", r["test_score"]))
                    rows.append((*key, EARLY, "dev", r["dev_score"]))
                    budgets = r.get("budget_scores") or {}
                    rows += [(*key, str(b), "dev", budgets.get(str(b))) for b in p.budgets]
    return rows


def select(rows, method, budget, split) -> dict:
    """{(init, target): {seed: score}} of one table (missing budgets dropped)."""
    out = {}
    for m, init, target, seed, b, s, score in rows:
        if m == method and b == budget and s == split and score is not None:
            out.setdefault((init, target), {})[seed] = score
    return out


def mean_std(values):
    """(mean, sample std) of a list; std None for a single value."""
    values = list(values)
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_cell(values) -> str:
    """Mean ± std (sample std over seeds) in points (score x 100), "—" when nothing is there."""
    mean, std = mean_std(values)
    if mean is None:
        return "—"
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def row_mean(cells: dict, targets, seeds):
    """Per seed the mean over the targets that have that seed, then those means over seeds; and
    whether every target contributed."""
    per_seed = []
    for s in seeds:
        vals = [cells[t][s] for t in targets if s in cells.get(t, {})]
        if vals:
            per_seed.append(statistics.fmean(vals))
    complete = all(set(seeds) <= set(cells.get(t, {})) for t in targets)
    return per_seed, complete


# --------------------------------------------------------------------------- report: files

def score_table(rows, p, method, budget, split, majority) -> list:
    """Rows: initialisations; columns: targets (dominated ones marked †) and the mean. The test
    table ends with the majority-answer score, the floor that transfer has to beat."""
    table = select(rows, method, budget, split)
    header = ["init", *[f"{m['task']} †" if m["flagged"] else m["task"] for m in majority], "mean"]
    body = []
    for init in p.all_inits:
        cells = {t: table.get((init, t), {}) for t in p.all_targets}
        per_seed, complete = row_mean(cells, p.all_targets, p.seeds)
        mean = fmt_cell(per_seed) + ("" if complete or not per_seed else " *")
        body.append([init, *[fmt_cell(cells[t].values()) for t in p.all_targets], mean])
    if split == "test":
        scores = [m["score"] for m in majority]
        body.append(["*majority answer*", *[fmt_cell([x]) for x in scores], fmt_cell([statistics.fmean(scores)])])
    return md_table(header, body)


def init_temperature(p: StudyPlan, init) -> str:
    score = init_spec(init).score  # a score's own, or the score a peers' combination reads (ties=Loss)
    if score is None or score not in p.temperatures:
        return "—"
    return temperature_text(score_spec(score), p.temperatures[score], p.per_token)


def weights_lines(p: StudyPlan, method) -> list:
    """Per initialisation: temperature, mean effective number of sources, heat map."""
    body = []
    for init in p.init_names:
        weights = read_init_weights(p, method, init)
        if not weights:
            continue
        eff = statistics.fmean(effective_sources(ws.values()) for ws in weights.values())
        temp = init_temperature(p, init)
        heat = p.init_dir(method, init) / "hot_pic_all.png"
        link = "—"
        if heat.is_file():
            dest = p.out / "heatmaps" / f"{method}_{init}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(heat, dest)
            link = f"![{method} {init}](heatmaps/{dest.name})"
        body.append([init, temp, f"{eff:.2f}", f"{len(weights)}/{len(p.all_targets)}", link])
    if not body:
        return []
    return md_table(["init", "T", "effective sources", "targets", "heat map"], body)


# ---- the initialisations' cost and, for LoRA, the paper's rule against the exact product (pewe.study.ensemble)

COMPUTE_CSV = "init_compute.csv"  # seconds vary between runs and machines: kept out of report.md, which is reproducible


def _mean_of(sidecars, field):
    values = [float(side[field]) for side in sidecars.values() if isinstance(side.get(field), (int, float))]
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else None


def init_cost_lines(p: StudyPlan, method) -> list:
    """Per initialisation, from its sidecars: its parameters, LoraHub's mean loss evaluations, and
    for LoRA the mean relative error of the paper's rule s (sum w B)(sum w A) against the exact
    s sum w B A at its weights. Empty when no initialisation has any of them."""
    body = []
    for init in p.init_names:
        sides = read_init_sidecars(p, method, init)
        if not sides:
            continue
        params = next((side.get("merge") for side in sides.values() if side.get("merge")), None) or {}
        evals, error = _mean_of(sides, "loss_evaluations"), _mean_of(sides, "lora_product_error")
        row = [", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in params.items()) or "—",
               "—" if evals is None else f"{evals:.0f}", "—" if error is None else f"{100 * error:.2f} %"]
        body.append([init, *row])
    if not any(cell != "—" for r in body for cell in r[1:]):
        return []
    return md_table(["init", "parameters", "loss evaluations", "paper's LoRA rule vs exact"], body)


def write_init_compute(p: StudyPlan) -> Path | None:
    """``init_compute.csv``: per method, initialisation and target, the sidecar's compute seconds,
    LoraHub's loss evaluations and the LoRA product error (blank where there is none)."""
    fields = ("compute_seconds", "loss_evaluations", "lora_product_error")
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["method", "init", "target", *fields])
    n = 0
    for method in p.methods:
        for init in p.init_names:
            for target, side in read_init_sidecars(p, method, init).items():
                out.writerow([method, init, target, *("" if side.get(f) is None else repr(side[f]) for f in fields)])
                n += 1
    if not n:
        return None
    atomic_write_text(p.out / COMPUTE_CSV, buf.getvalue())
    return p.out / COMPUTE_CSV


def write_csv(path, rows):
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["method", "init", "target", "seed", "budget", "split", "score"])
    for r in rows:
        out.writerow([*r[:6], "" if r[6] is None else repr(r[6])])
    atomic_write_text(path, buf.getvalue())


def refresh_summaries(p: StudyPlan, precision):
    """Rebuild the files that gather every target (similarity result.tsv, the initialisations'
    weights and heat maps, each tuned folder's result.tsv): shards running at once may each have
    written them before the others had finished."""
    for method in p.methods:
        if any(p.part_path(method, t).is_file() for t in p.all_targets):
            write_similarity_files(p, method, p.score_options(precision))
        for init in p.init_names:
            write_init_summary(p, method, init)
        for folder in sorted((p.out / method / "targets").glob("*/seed_*")):
            rebuild_result_tsv(folder)


def step_report(p: StudyPlan) -> Path:
    """report.md, report.csv, gain.png and heatmaps/ from the files alone (any process, any time)."""
    majority = [majority_baseline(p.target_task_dir, t) for t in p.all_targets]
    for m in majority:
        print(f"majority baseline {m['task']}: always {m['answer']!r} ({100 * m['share']:.0f} % of test) scores "
              f"{100 * m['score']:.2f} {m['metric']}" + ("  <- dominated by one answer" if m["flagged"] else ""))
    rows = collect(p)
    write_csv(p.out / "report.csv", rows)
    runs = len({r[:4] for r in rows})
    planned = len(p.methods) * len(p.seeds) * sum(p.covers(i, t) for i in p.all_inits for t in p.all_targets)
    lines = ["# Leave-one-out transfer study", "",
             f"Backbone `{Path(p.model).name}`; {len(p.tasks)} source tasks (tuned on their full splits) and "
             f"{len(p.all_targets)} targets (tuned on their few-shot splits; a target in the pool leaves its own "
             f"source out); seeds "
             f"{', '.join(map(str, p.seeds))}; lr {p.learning_rate:g}, batch {p.batch_size}, validation every "
             f"{p.valid_interval} updates, early stop after {p.early_stop}, at most {p.target_train_iters} updates.",
             f"Cells: mean ± sample std over seeds of the score × 100; mean column: per seed the mean over "
             f"targets, then mean ± std over seeds (* = not every target has this initialisation). "
             f"Finished runs: {runs} of {planned}.", "",
             "## Majority-answer baseline (test)", "",
             "A target whose test set is dominated by one answer (share > 50 %, marked †) can look like "
             "transfer when a delta learns to always give that answer: compare its scores with this one.", ""]
    lines += md_table(["target", "metric", "majority answer", "share", "score", "dominated"],
                      [[m["task"], m["metric"], f"`{m['answer']}`", f"{100 * m['share']:.0f} %",
                        f"{100 * m['score']:.2f}", "† yes" if m["flagged"] else "no"] for m in majority])
    lines.append("")
    tables = {method: select(rows, method, EARLY, "test") for method in p.methods}
    if any(table for table in tables.values()):
        plot_gain(p.out / "gain.png", p, tables)
        lines[2:2] = [*answer_lines(p, tables, read_init_weights), "![gain over random init](gain.png)", ""]
    for method in p.methods:
        lines += [f"## {method}", "", "### Test score after early stopping", ""]
        lines += score_table(rows, p, method, EARLY, "test", majority) + [""]
        for b in p.budgets:
            lines += [f"### Dev score after {b} updates", ""]
            lines += score_table(rows, p, method, str(b), "dev", majority) + [""]
        table = weights_lines(p, method)
        if table:
            lines += ["### Initialisation weights", "",
                      "Effective sources = (Σ |w|)² / Σ w² averaged over targets (1: one source, n: n equal weights; for weights summing to 1, 1 / Σ w²).", ""]
            lines += table + [""]
        cost = init_cost_lines(p, method)
        if cost:
            lines += ["### Initialisation parameters and the LoRA product", "",
                      "The peers' combinations' parameters; LoraHub's loss evaluations on the target's train split "
                      "(mean over targets); for LoRA, ‖s(Σ w B)(Σ w A) − s Σ w B A‖ / ‖s Σ w B A‖ over all modules "
                      "at each initialisation's weights, mean over targets: how far the paper's rule is from the "
                      f"exact weighted sum of the products. Seconds per target: {COMPUTE_CSV}.", ""]
            lines += cost + [""]
    if "manual" in p.init_names:
        groups = "; ".join(f"{g}: {' '.join(m)}" for g, m in p.groups.items()) or "none"
        alone = [t for t in p.all_targets if not p.covers("manual", t)]
        lines += [f"Manual groups (restricted to the study tasks): {groups}."
                  + (f" No manual initialisation for {', '.join(alone)} (alone in their group)." if alone else ""), ""]
    write_init_compute(p)
    report = p.out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report

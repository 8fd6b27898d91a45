"""Initial deltas for every target from the dev gain of a short tuning (the original's
unit_model_Performance.py): score(source, target) = dev score of the source delta after
tune_all_ckpt.py's short tuning on the target minus its zero-shot dev score (dev_all_ckpt.py);
weights softmax(+score / tem) over the sources other than the target. As the original, the averaged
deltas are the *tuned* ones ({target}/{source}/checkpoint-best); --average=source averages the
source deltas instead, as every other method does.

    bash scripts/adapter_tuneall.sh; bash scripts/adapter_devall.sh
    python unit_model/unit_model_Performance.py
    python tune_hps_singletask.py --do_train --do_predict --train_checkpoint runs/adapter/init/Performance \
        --output_dir runs/adapter/from_Performance

Writes the score matrix (result.tsv, the similarity layout, and scores.json) next to the averaged
deltas; unit_model_others.py can reuse it. Every tunable below can be overridden as --name=value;
`--help` lists them. In the path defaults {delta} stands for that tunable.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: run from anywhere
from pewe.model import REPO  # noqa: E402

_RUNS = REPO / "runs" / "{delta}"  # where the scripts of this repo put their outputs ({delta} = the tunable below)
_METRIC = "Performance"  # pewe.scores: higher = closer

delta = "adapter"  # adapter, lora or prefix: the kind of every delta
tem = 0.001  # softmax temperature (the paper: 0.001)
source_ckpt_path = str(_RUNS / "sources")  # {task}/checkpoint-best*.safetensors (a tune_hps_singletask.py output_dir)
tuned_ckpt_path = str(_RUNS / "tune_all")  # {target}/{source}/result.json and checkpoints (tune_all_ckpt.py)
zero_shot_path = str(_RUNS / "dev_all" / "result.tsv")  # zero-shot dev scores, similarity layout (dev_all_ckpt.py)
tuned_checkpoint = "best"  # the short tuning's result: best (best dev score and its delta; the original) or last
average = "tuned"  # average the tuned deltas (tuned; the original) or the source deltas (source)
save_ckpt_path = str(_RUNS / "init" / "Performance")  # output folder: result.tsv, without_{task}_checkpoint.safetensors, heat map
targets = []  # targets (default: every source, leaving itself out, as the original)
source_tasks = []  # sources (default: every source delta of source_ckpt_path)
task_list = []  # only these sources and targets (the original's TASK_LIST)


def main(argv=None):
    from pewe.configurator import configure
    from pewe.cli import run_cli

    a = configure(globals(), __file__, argv)
    return run_cli(_run, a)


def _run(a):
    from pewe import delta_scores as S
    from pewe import ensemble as E
    from pewe import layout as L
    from pewe import weights as W
    from pewe.scores import check_temperature

    E.check_delta_name(a.delta)
    check_temperature(a.tem)
    if a.average not in ("tuned", "source"):
        raise W.EnsembleError(f"average must be tuned or source, not {a.average!r}")
    fields = {"delta": a.delta}
    source_dir, save_dir = E.fill_path(a.source_ckpt_path, **fields), E.fill_path(a.save_ckpt_path, **fields)
    tuned_dir, zero_path = E.fill_path(a.tuned_ckpt_path, **fields), E.fill_path(a.zero_shot_path, **fields)
    pool = E.select_pool(source_dir, a.source_tasks, a.task_list)
    targets = E.select_targets(a.targets, pool, a.task_list)
    tuned = S.read_tuned_scores(tuned_dir, targets, pool, a.tuned_checkpoint)
    scores = S.performance_scores(tuned, L.read_similarity(zero_path), targets, pool, where=str(zero_path))
    sim = E.write_score_file(save_dir, scores, _METRIC, tuned=str(tuned_dir), zero_shot=str(zero_path),
                             tuned_checkpoint=a.tuned_checkpoint)
    weights = W.loo_weights(scores, pool, W.metric_sign(_METRIC), a.tem, targets=targets, where=str(sim))
    meta = dict(scores=scores, temperature=a.tem, metric=_METRIC, similarity=str(sim.resolve()), averaged=a.average)
    if a.average == "tuned":
        per_target = {t: {s: S.tuned_checkpoint(tuned_dir, t, s, a.tuned_checkpoint) for s in w}
                      for t, w in weights.items()}
        E.write_ensemble(save_dir, weights, per_target, method="softmax", sources=pool, expect_method=a.delta,
                         **meta)
    else:
        E.write_ensemble(save_dir, weights, pool, method="softmax", expect_method=a.delta, **meta)
    E.report_written(save_dir, weights, f"{sim}: {len(weights)} targets x {len(pool)} sources, softmax(+gain/{a.tem:g}), "
                                        f"averaging the {a.average} deltas")


if __name__ == "__main__":
    sys.exit(main())

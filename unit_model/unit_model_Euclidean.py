"""Initial deltas for every target from the Euclidean distance a source delta moves when tuned on the
target (the original's unit_model_Euclidean.py): score(source, target) = sum over tensors of
||source - tuned||_2, tuned = the source delta after tune_all_ckpt.py's short tuning on the target;
weights softmax(-score / tem) over the sources other than the target; the source deltas are averaged.

    bash scripts/adapter_tuneall.sh              # -> runs/adapter/tune_all/{target}/{source}/
    python unit_model/unit_model_Euclidean.py
    python tune_hps_singletask.py --do_train --do_predict --train_checkpoint runs/adapter/init/Euclidean \
        --output_dir runs/adapter/from_Euclidean

Writes the score matrix (result.tsv, the similarity layout, and scores.json) next to the averaged
deltas; unit_model_others.py can reuse it. Every tunable below can be overridden as --name=value;
`--help` lists them. In the path defaults {delta} stands for that tunable.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: run from anywhere
from pewe.model import REPO  # noqa: E402

_RUNS = REPO / "runs" / "{delta}"  # where the scripts of this repo put their outputs ({delta} = the tunable below)
_METRIC = "Euclidean"  # pewe.scores: lower = closer

delta = "adapter"  # adapter, lora or prefix: the kind of every delta
tem = 0.1  # softmax temperature (the paper: 0.1)
source_ckpt_path = str(_RUNS / "sources")  # {task}/checkpoint-best*.safetensors (a tune_hps_singletask.py output_dir)
tuned_ckpt_path = str(_RUNS / "tune_all")  # {target}/{source}/checkpoint-{best,last}.safetensors (tune_all_ckpt.py)
tuned_checkpoint = "best"  # the tuned delta: best (by dev during the short tuning; the original) or last
save_ckpt_path = str(_RUNS / "init" / "Euclidean")  # output folder: result.tsv, without_{task}_checkpoint.safetensors, heat map
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
    from pewe import weights as W
    from pewe.scores import check_temperature

    E.check_delta_name(a.delta)
    check_temperature(a.tem)
    fields = {"delta": a.delta}
    source_dir, save_dir = E.fill_path(a.source_ckpt_path, **fields), E.fill_path(a.save_ckpt_path, **fields)
    tuned_dir = E.fill_path(a.tuned_ckpt_path, **fields)
    pool = E.select_pool(source_dir, a.source_tasks, a.task_list)
    targets = E.select_targets(a.targets, pool, a.task_list)
    scores = S.euclidean_scores(pool, tuned_dir, targets, a.tuned_checkpoint, expect_method=a.delta)
    sim = E.write_score_file(save_dir, scores, _METRIC, sources=str(source_dir), tuned=str(tuned_dir),
                             tuned_checkpoint=a.tuned_checkpoint)
    weights = W.loo_weights(scores, pool, W.metric_sign(_METRIC), a.tem, targets=targets, where=str(sim))
    E.write_ensemble(save_dir, weights, pool, method="softmax", expect_method=a.delta, scores=scores,
                     temperature=a.tem, metric=_METRIC, similarity=str(sim.resolve()),
                     tuned=f"{tuned_dir.resolve()}/{{target}}/{{source}}/checkpoint-{a.tuned_checkpoint}.safetensors")
    E.report_written(save_dir, weights, f"{sim}: {len(weights)} targets x {len(pool)} sources, "
                                        f"softmax(-distance/{a.tem:g})")


if __name__ == "__main__":
    sys.exit(main())

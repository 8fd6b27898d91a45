"""Initial deltas for every target from the cosine similarity of weights (the original's
unit_model_cos.py): score(source, target) = mean over tensors of cos(source delta, the delta tuned on
the target from random init), weights softmax(+score / tem) over the sources other than the target.

    bash scripts/adapter.sh                      # each target tuned from random init -> runs/adapter/random
    python unit_model/unit_model_cos.py
    python tune_hps_singletask.py --do_train --do_predict --train_checkpoint runs/adapter/init/Cosine \
        --output_dir runs/adapter/from_Cosine

Writes the score matrix (result.tsv, the similarity layout, every source of a target including itself;
and scores.json) next to the averaged deltas; unit_model_others.py can reuse it. Every tunable below
can be overridden as --name=value; `--help` lists them. In the path defaults {delta} stands for that
tunable.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: run from anywhere
from pewe.model import REPO  # noqa: E402

_RUNS = REPO / "runs" / "{delta}"  # where the scripts of this repo put their outputs ({delta} = the tunable below)
_METRIC = "Cosine"  # pewe.scores: higher = closer

delta = "adapter"  # adapter, lora or prefix: the kind of every delta
tem = 0.001  # softmax temperature (the paper: 0.001)
source_ckpt_path = str(_RUNS / "sources")  # {task}/checkpoint-best*.safetensors (a tune_hps_singletask.py output_dir)
random_tuned_ckpt_path = str(_RUNS / "random")  # {task}/checkpoint-best*.safetensors: each target tuned from random init
save_ckpt_path = str(_RUNS / "init" / "Cosine")  # output folder: result.tsv, without_{task}_checkpoint.safetensors, heat map
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
    fields = {"delta": a.delta}
    source_dir, save_dir = E.fill_path(a.source_ckpt_path, **fields), E.fill_path(a.save_ckpt_path, **fields)
    random_dir = E.fill_path(a.random_tuned_ckpt_path, **fields)
    pool = E.select_pool(source_dir, a.source_tasks, a.task_list)
    targets = E.select_targets(a.targets, pool, a.task_list)
    tuned = L.source_checkpoints(random_dir, targets)  # {target: its delta tuned from random init}
    scores = S.cosine_scores(tuned, pool, expect_method=a.delta)
    sim = E.write_score_file(save_dir, scores, _METRIC, sources=str(source_dir), tuned=str(random_dir))
    weights = W.loo_weights(scores, pool, W.metric_sign(_METRIC), a.tem, targets=targets, where=str(sim))
    E.write_ensemble(save_dir, weights, pool, method="softmax", expect_method=a.delta, scores=scores,
                     temperature=a.tem, metric=_METRIC, similarity=str(sim.resolve()))
    E.report_written(save_dir, weights, f"{sim}: {len(weights)} targets x {len(pool)} sources, softmax(+cosine/{a.tem:g})")


if __name__ == "__main__":
    sys.exit(main())

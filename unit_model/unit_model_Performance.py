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
origin_data_path = str(REPO / "data" / "fewshot")  # folder of task folders: their names are the targets
source_ckpt_path = str(_RUNS / "sources")  # {task}/checkpoint-best*.safetensors (a tune_hps_singletask.py output_dir)
tuned_ckpt_path = str(_RUNS / "tune_all")  # {target}/{source}/result.json and checkpoints (tune_all_ckpt.py)
zero_shot_path = str(_RUNS / "dev_all" / "result.tsv")  # zero-shot dev scores, similarity layout (dev_all_ckpt.py)
tuned_checkpoint = "best"  # the short tuning's result: best (best dev score and its delta; the original) or last
average = "tuned"  # average the tuned deltas (tuned; the original) or the source deltas (source)
save_ckpt_path = str(_RUNS / "init" / "Performance")  # output folder: result.tsv, without_{task}_checkpoint.safetensors, heat map
task_list = []  # sources and targets (default: the task folders that have a source checkpoint)


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
    tasks = E.find_tasks(a.origin_data_path, source_dir, a.task_list)
    checkpoints = L.source_checkpoints(source_dir, tasks)
    tuned = S.read_tuned_scores(tuned_dir, tasks, tasks, a.tuned_checkpoint)
    scores = S.performance_scores(tuned, L.read_similarity(zero_path), tasks, tasks, where=str(zero_path))
    sim = E.write_score_file(save_dir, scores, _METRIC, tuned=str(tuned_dir), zero_shot=str(zero_path),
                             tuned_checkpoint=a.tuned_checkpoint)
    weights = W.loo_weights(scores, tasks, W.metric_sign(_METRIC), a.tem, targets=tasks, where=str(sim))
    meta = dict(scores=scores, temperature=a.tem, metric=_METRIC, similarity=str(sim.resolve()), averaged=a.average)
    if a.average == "tuned":
        per_target = {t: {s: S.tuned_checkpoint(tuned_dir, t, s, a.tuned_checkpoint) for s in w}
                      for t, w in weights.items()}
        E.write_ensemble(save_dir, weights, per_target, method="softmax", sources=tasks, expect_method=a.delta,
                         **meta)
    else:
        E.write_ensemble(save_dir, weights, checkpoints, method="softmax", expect_method=a.delta, **meta)
    print(f"{sim}: {len(weights)} targets x {len(tasks) - 1} sources, softmax(+gain/{a.tem:g}), "
          f"averaging the {a.average} deltas")
    for target, w in weights.items():
        print(E.summary_line(target, w))
    print(f"wrote {save_dir}/without_{{task}}_checkpoint.safetensors, final_weight.txt, weights.csv, hot_pic_all.png")
    print(f"tune from them: python tune_hps_singletask.py --do_train --train_checkpoint {save_dir} ...")


if __name__ == "__main__":
    sys.exit(main())

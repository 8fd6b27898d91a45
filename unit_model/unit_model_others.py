"""Initial deltas for every target: the leave-one-out weighted average of the source deltas, with
weights softmax(sign * score / tem) read from a similarity result.tsv (sign from --metric).

    python unit_model/unit_model_others.py --metric Loss --tem 0.1
    python tune_hps_singletask.py --do_train --do_predict --train_checkpoint runs/adapter/init/Loss \
        --output_dir runs/adapter/from_Loss

origin_data_path (the original's name) is the similarity result.tsv: its target lines are the
targets and its ``source,score`` lines the sources, read by name, so the targets need not be
sources (a target that is also a source leaves itself out). It may also be a folder of block / layer
files (*_result.tsv): one set of averaged deltas per file, in {save_ckpt_path}/{file stem}/.
Every tunable below can be overridden as --name=value; `--help` lists them. In the path defaults
{delta} and {metric} stand for those tunables.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: run from anywhere
from pewe.model import REPO  # noqa: E402

_RUNS = REPO / "runs" / "{delta}"  # where the scripts of this repo put their outputs ({delta} = the tunable below)

delta = "adapter"  # adapter, lora or prefix: the kind of every source delta
tem = 0.1  # softmax temperature (paper: 0.1 for Loss, Euclidean; 0.001 for Cosine, Performance)
metric = "Loss"  # similarity metric, gives the sign (pewe.scores): Loss, KL, EL2N, GraNd, Cosine, ...
origin_data_path = str(_RUNS / "similarity" / "{metric}" / "result.tsv")  # the similarity result.tsv (as the original): its target lines are the targets, its source,score lines the sources; or a folder of *_result.tsv (block / layer) files
source_ckpt_path = str(_RUNS / "sources")  # {source}/checkpoint-best*.safetensors (a tune_hps_singletask.py output_dir)
save_ckpt_path = str(_RUNS / "init" / "{metric}")  # output folder: without_{task}_checkpoint.safetensors, final_weight.txt, heat map
task_list = []  # only these targets and sources (default: every target and source of the similarity file)


def main(argv=None):
    from pewe.configurator import configure
    from pewe.cli import run_cli

    a = configure(globals(), __file__, argv)
    return run_cli(_run, a)


def _run(a):
    from pewe import ensemble as E
    from pewe import layout as L
    from pewe import weights as W

    E.check_delta_name(a.delta)
    W.metric_sign(a.metric)
    fields = {"delta": a.delta, "metric": a.metric}
    source_dir, save_dir = E.fill_path(a.source_ckpt_path, **fields), E.fill_path(a.save_ckpt_path, **fields)
    # every file's weights first, so a bad file stops the run before anything is written
    plans = []
    for sim, sub in L.similarity_files(E.fill_path(a.origin_data_path, **fields)):
        scores = L.read_similarity(sim)
        targets = E.select_targets((), scores, a.task_list, where=str(sim))
        named = list(dict.fromkeys(s for t in targets for s in scores[t]))  # the sources, in file order
        checkpoints = E.select_pool(source_dir, named, a.task_list)
        weights = W.loo_weights(scores, checkpoints, W.file_sign(sim, a.metric), a.tem, targets=targets, where=str(sim))
        plans.append((sim, save_dir / sub if sub else save_dir, scores, weights, checkpoints))
    for sim, out, scores, weights, checkpoints in plans:
        E.write_ensemble(out, weights, checkpoints, method="softmax", expect_method=a.delta, scores=scores,
                         temperature=a.tem, metric=a.metric, similarity=str(sim.resolve()))
        sign = "+" if W.metric_sign(a.metric) > 0 else "-"
        E.report_written(out, weights, f"{sim}: {len(weights)} targets x {len(checkpoints)} sources, "
                                       f"softmax({sign}score/{a.tem:g})")


if __name__ == "__main__":
    sys.exit(main())

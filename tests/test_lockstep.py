"""Lockstep runs (pewe/stacked.py, pewe.trainer.train_runs): K runs in one forward end as the same K
runs one at a time, up to float rounding, with dropout off, on the CPU in fp32.

Tolerances (measured here, with margin): train losses within 1e-5 relative; every delta tensor and
every Adafactor moment within 1e-4 of its tensor's largest magnitude; dev, test and budget scores,
best steps, update counts and early stops exactly equal. The differences come from float rounding:
a row padded to a longer row of another run is reduced in other blocks, and the stacked optimizer
takes each run's norms in one reduction over its slice."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.optimization import Adafactor

import delta_modules as dm
import run_study
import tune_all_ckpt
from conftest import REPO, TINY_TASKS
from pewe import trainer
from pewe.data import TextOptions, load_split
from pewe.model import load_backbone
from pewe.stacked import StackedAdafactor, StackedDeltas, clip_grad_norms
from pewe.trainer import Run, TrainSettings, train_runs
from pewe.tuning import initial_delta_state

torch.set_num_threads(1)

CONFIGS = {"adapter": dm.DeltaConfig("adapter", adapter_size=4), "lora": dm.DeltaConfig("lora", lora_r=2, lora_alpha=4),
           "prefix": dm.DeltaConfig("prefix", prefix_num=3, prefix_r=4)}
LOSS_RTOL, TENSOR_RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def quiet_backbone(tiny_backbone, tmp_path_factory):
    """The tiny backbone with dropout off (the same weights), saved as its own folder."""
    from transformers import T5ForConditionalGeneration

    from pewe.backbone import save_backbone

    model, tok = load_backbone(tiny_backbone)
    model.config.dropout_rate = 0.0
    quiet = T5ForConditionalGeneration(model.config)
    quiet.load_state_dict(model.state_dict())
    return save_backbone(quiet, tok, tmp_path_factory.mktemp("quiet-t5"))


def close(a: torch.Tensor, b: torch.Tensor, rtol=TENSOR_RTOL) -> bool:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a.double() - b.double()).abs().max().item() <= rtol * scale


# ----------------------------------------------------------------------------- the stacked forward

@pytest.mark.parametrize("method", list(CONFIGS))
def test_each_row_goes_through_its_own_runs_delta(quiet_backbone, method):
    base, _ = load_backbone(quiet_backbone)
    model = dm.attach_delta(base, CONFIGS[method]).eval()
    g = torch.Generator().manual_seed(0)
    states = [{n: torch.randn(p.shape, generator=g) * 0.1 for n, p in dm.delta_named_parameters(model)} for _ in range(3)]
    stacked = StackedDeltas(model, 3)
    for k, state in enumerate(states):
        stacked.load_state(k, state)
    ids, labels = torch.randint(2, 300, (6, 7), generator=g), torch.randint(2, 300, (6, 4), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded row
    for runs, sizes in (([0, 1, 2], [2, 2, 2]), ([2, 0, 1], [1, 3, 2]), ([1], [6])):  # equal blocks, unequal, one
        with stacked.rows(runs, sizes), torch.no_grad():
            together = model(input_ids=ids, attention_mask=mask, labels=labels).logits
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=1, do_sample=False)
        start = 0
        for run, size in zip(runs, sizes):
            dm.load_delta_state(model, states[run])
            rows = slice(start, start + size)
            with torch.no_grad():
                alone = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).logits
                gen = model.generate(input_ids=ids[rows], attention_mask=mask[rows], max_new_tokens=5, num_beams=1,
                                     do_sample=False)
            assert close(together[rows], alone, 1e-5), (method, runs, sizes, run)
            assert torch.equal(generated[rows, :gen.shape[1]], gen)
            start += size
    # outside the context the model is its own again (the last loaded state)
    assert not any(k in m.__dict__ for m in model.modules() for k in ("forward", "compute", "layer_kv")
                   if isinstance(m, dm.DELTA_TYPES))


def test_stacked_adafactor_and_clip_are_per_run(quiet_backbone):
    """Three runs with their own learning rates, one of which sits out two updates (other step
    counts), against one transformers Adafactor + clip_grad_norm_ per run."""
    torch.manual_seed(0)
    shapes = [(5, 3), (4,), (2, 3, 4)]  # 2-D and 3-D: factored moments; 1-D: the full one
    lrs = [0.03, 0.01, 0.003]
    stacked = [torch.randn(3, *s, requires_grad=True) for s in shapes]
    single = [[p[k].detach().clone().requires_grad_(True) for p in stacked] for k in range(3)]
    optims = [Adafactor(ps, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
              for ps, lr in zip(single, lrs)]
    opt = StackedAdafactor(stacked, lrs)
    for it in range(6):
        runs = [0, 2] if it in (1, 2) else [0, 1, 2]  # run 1 leaves the batch for two updates
        grads = [torch.randn(3, *s) * (10.0 ** (k - 1)) for k, s in enumerate(shapes)]  # large and small norms
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
            p.grad[[r for r in range(3) if r not in runs]] = 0
        norms = clip_grad_norms(stacked, 0.1, runs)
        opt.step(runs)
        for k in runs:
            for p, g in zip(single[k], grads):
                p.grad = g[k].clone()
            assert abs(torch.nn.utils.clip_grad_norm_(single[k], 0.1).item() - norms[runs.index(k)]) < 1e-5 * norms[runs.index(k)]
            optims[k].step()
    for k in range(3):
        for i, p in enumerate(stacked):
            assert close(p[k].detach(), single[k][i].detach(), 1e-5), (k, i)
        for i, (mine, theirs) in enumerate(zip(opt.run_state(k), (optims[k].state[p] for p in single[k]))):
            assert mine["step"] == theirs["step"] == (4 if k == 1 else 6)
            for key in theirs:
                if key != "step":
                    assert close(mine[key], torch.as_tensor(theirs[key]), 1e-5), (k, i, key)


@pytest.mark.parametrize("method", ["adapter", "prefix"])
def test_the_similarity_engine_scores_stacked_sources_as_one_at_a_time(quiet_backbone, tiny_tasks, tmp_path, method):
    """Four sources in groups of three (3 + 1): every forward score (logits and hidden states) as
    from one source at a time; GraNd (taken one source at a time either way) identical."""
    from pewe.similarity import ScoreOptions, SimilarityEngine

    base, tok = load_backbone(quiet_backbone)
    config = CONFIGS[method]
    model = dm.attach_delta(base, config)
    ckpts = {}
    for i in range(5):
        ckpts[f"s{i}"] = tmp_path / f"s{i}.safetensors"
        g = torch.Generator().manual_seed(i)
        dm.save_delta(ckpts[f"s{i}"], {n: torch.randn(p.shape, generator=g) * 0.05
                                      for n, p in dm.delta_named_parameters(model)}, config)
    ref = {"babi-qa1": ckpts.pop("s4")}
    names = ["Loss", "KL", "EL2N", "Cosine_of_Logits_and_Labels", "GraNd", "block"]
    options = ScoreOptions(num_batches=2, batch_size=4, grand_batches=2, max_output_length=8, quiet=True)
    got = {k: SimilarityEngine(model, tok, "cpu", options, batch_sources=k).score_tasks(
        ["babi-qa1"], tiny_tasks, ckpts, names, ref) for k in (1, 3)}
    for name in names:
        for group, table in got[1][name].items():
            for source, value in table["babi-qa1"].items():
                other = got[3][name][group]["babi-qa1"][source]
                if name == "GraNd":
                    assert other == value, (name, source)
                else:
                    assert other == pytest.approx(value, rel=1e-5, abs=1e-6), (name, group, source)


# ----------------------------------------------------------------------------- the training loop

def rows(tok, tasks, task, split):
    return load_split(tasks, task, f"{task}_64_42", split, tok, TextOptions(128, 8), split == "train")


def group(tok, tasks, base, config, out, init_file):
    """Four runs that differ in everything a run owns and stop at different times: an early stop
    (babi-qa1), a whole budget with budget scores (babi-qa1, another seed), a shorter budget and its
    own learning rate on other data (csqa2: other lengths, so other paddings), and a run from a
    delta file (babi-qa6) that ends between two validations."""
    spec = [("babi-qa1", 42, 16, 1, 0.03, (0, 6)), ("babi-qa1", 43, 16, 0, 0.03, (0, 6, 16)),
            ("csqa2", 44, 10, 0, 0.01, ()), ("babi-qa6", 45, 14, 0, 0.03, (3,))]
    runs = []
    for i, (task, seed, iters, early, lr, budgets) in enumerate(spec):
        s = TrainSettings(learning_rate=lr, batch_size=8, train_iters=iters, valid_interval=4, log_interval=4,
                          early_stop=early, predict_batch_size=16, max_output_length=8, seed=seed, progress=False)
        runs.append(Run(rows(tok, tasks, task, "train"), rows(tok, tasks, task, "dev"), "EM", s, Path(out) / f"run{i}",
                        init_file if task == "babi-qa6" else None, initial_delta_state(base, config, seed),
                        {"task": task}, budgets))
    return runs


def assert_same_runs(alone, together, dir_a, dir_b):
    for i, (a, b) in enumerate(zip(alone, together)):
        for key in ("num_updates", "best", "best_step", "bad", "done", "stopped_early", "budget_scores", "epoch",
                    "batch_in_epoch"):
            assert a[key] == b[key], (i, key, a[key], b[key])
        assert [h[:2] for h in a["history"]] == [h[:2] for h in b["history"]]
        assert all(abs(x[2] - y[2]) <= LOSS_RTOL * abs(x[2]) for x, y in zip(a["history"], b["history"]))
        for name in ("checkpoint-best.safetensors", "resume.safetensors"):
            x, y = load_file(str(Path(dir_a) / f"run{i}" / name)), load_file(str(Path(dir_b) / f"run{i}" / name))
            assert set(x) == set(y)
            for k in x:
                if k.startswith("rng"):
                    continue
                assert close(x[k], y[k]) if x[k].is_floating_point() else torch.equal(x[k], y[k]), (i, name, k)
        meta_a = json.loads((Path(dir_a) / f"run{i}" / "checkpoint-best.json").read_text())
        meta_b = json.loads((Path(dir_b) / f"run{i}" / "checkpoint-best.json").read_text())
        assert {k: v for k, v in meta_a.items() if k != "tensors_sha256"} == \
            {k: v for k, v in meta_b.items() if k != "tensors_sha256"}


@pytest.mark.parametrize("method,micro,rows", [("adapter", 16, 256), ("lora", 16, 256), ("prefix", 16, 256),
                                               ("lora", 4, 256), ("adapter", 16, 16)])
def test_lockstep_equals_one_at_a_time(quiet_backbone, tiny_tasks, tmp_path, monkeypatch, method, micro, rows):
    monkeypatch.setattr(trainer, "MICRO_BATCH", micro)  # 4: each update of 8 rows is two micro-batches
    monkeypatch.setattr(trainer, "MAX_FORWARD_ROWS", rows)  # 16: the four runs' rows in two forwards
    base, tok = load_backbone(quiet_backbone)
    config = CONFIGS[method]
    model = dm.attach_delta(copy.deepcopy(base), config)
    init_file = tmp_path / "init.safetensors"
    dm.save_delta(init_file, initial_delta_state(base, config, 7), config)
    alone = [train_runs(model, tok, [run], "cpu")[0] for run in group(tok, tiny_tasks, base, config, tmp_path / "a", init_file)]
    together = train_runs(model, tok, group(tok, tiny_tasks, base, config, tmp_path / "b", init_file), "cpu")
    assert [r["num_updates"] for r in together] == [8, 16, 10, 14]  # the runs left the batch at different times
    assert together[0]["stopped_early"] and not together[1]["stopped_early"]
    assert "3" in together[3]["budget_scores"] and together[3]["history"][-1][0] == 12  # no validation at 14
    assert_same_runs(alone, together, tmp_path / "a", tmp_path / "b")


class Killed(Exception):
    pass


def kill_after(monkeypatch, writes):
    """Raise (a kill) after the ``writes``-th resume file is written."""
    real, count = trainer._write_resume, [0]

    def write(*args, **kw):
        real(*args, **kw)
        count[0] += 1
        if count[0] == writes:
            raise Killed

    monkeypatch.setattr(trainer, "_write_resume", write)


def with_init_file(backbone, method, tmp_path):
    """The backbone, its tokenizer, its copy with a ``method`` delta, the config, and an init delta file."""
    base, tok = load_backbone(backbone)
    config = CONFIGS[method]
    init_file = tmp_path / "init.safetensors"
    dm.save_delta(init_file, initial_delta_state(base, config, 7), config)
    return base, tok, dm.attach_delta(copy.deepcopy(base), config), config, init_file


def test_a_killed_group_resumes_each_run_from_its_own_files(quiet_backbone, tiny_tasks, tmp_path, monkeypatch):
    base, tok, model, config, init_file = with_init_file(quiet_backbone, "adapter", tmp_path)
    whole = train_runs(model, tok, group(tok, tiny_tasks, base, config, tmp_path / "whole", init_file), "cpu")
    # killed after 6 resume writes: the four runs' files at update 4, then two of the four at update 8,
    # so the runs come back at different updates (8, 8, 4, 4) and share the forwards again
    kill_after(monkeypatch, 6)
    with pytest.raises(Killed):
        train_runs(model, tok, group(tok, tiny_tasks, base, config, tmp_path / "killed", init_file), "cpu")
    monkeypatch.undo()
    counters = [trainer.resume_counters(tmp_path / "killed" / f"run{i}" / "resume.safetensors")["num_updates"]
                for i in range(4)]
    assert counters == [8, 8, 4, 4]
    again = train_runs(model, tok, group(tok, tiny_tasks, base, config, tmp_path / "killed", init_file), "cpu")
    assert_same_runs(whole, again, tmp_path / "whole", tmp_path / "killed")


def test_a_run_started_alone_resumes_in_a_group(quiet_backbone, tiny_tasks, tmp_path, monkeypatch):
    base, tok, model, config, init_file = with_init_file(quiet_backbone, "prefix", tmp_path)
    alone = [train_runs(model, tok, [run], "cpu")[0] for run in group(tok, tiny_tasks, base, config, tmp_path / "a", init_file)]
    runs = group(tok, tiny_tasks, base, config, tmp_path / "b", init_file)
    kill_after(monkeypatch, 2)  # run 1 alone, killed after its validations at 4 and 8
    with pytest.raises(Killed):
        train_runs(model, tok, [runs[1]], "cpu")
    monkeypatch.undo()
    assert trainer.resume_counters(tmp_path / "b" / "run1" / "resume.safetensors")["num_updates"] == 8
    together = train_runs(model, tok, runs, "cpu")  # resumed at 8 beside three runs that start at 0
    assert_same_runs(alone, together, tmp_path / "a", tmp_path / "b")
    assert train_runs(model, tok, runs, "cpu") == together  # all done: nothing trains


def test_a_group_refuses_runs_that_cannot_share_a_forward(quiet_backbone, tiny_tasks, tmp_path):
    from pewe.errors import UserError

    base, tok = load_backbone(quiet_backbone)
    config = CONFIGS["lora"]
    model = dm.attach_delta(copy.deepcopy(base), config)
    runs = group(tok, tiny_tasks, base, config, tmp_path, None)[:2]
    other = Run(**{**runs[1].__dict__, "settings": TrainSettings(batch_size=4, progress=False)})
    with pytest.raises(UserError, match="must share batch_size"):
        train_runs(model, tok, [runs[0], other], "cpu")
    with pytest.raises(UserError, match="same folder"):
        train_runs(model, tok, [runs[0], runs[0]], "cpu")


# ----------------------------------------------------------------------------- the entry points

def study_args(backbone, tasks, out, *extra):
    return ["--model", str(backbone), "--tokenizer_path", str(backbone), "--tasks", *TINY_TASKS,
            "--source_task_dir", str(tasks), "--target_task_dir", str(tasks), "--output_dir", str(out),
            "--seeds", "42", "43", "--step_budgets", "0", "4", "--scores", "Loss", "Euclidean", "Performance",
            "--groups", "babi-qa1 babi-qa6", "--source_train_iters", "8", "--target_train_iters", "12",
            "--valid_interval", "4", "--log_interval", "4", "--early_stop", "1", "--learning_rate", "0.01",
            "--pair_train_iters", "6", "--pair_valid_interval", "4", "--predict_batch_size", "16",
            "--max_output_length", "8", "--sim_batch_size", "8", "--adapter_size", "4", "--device", "cpu",
            "--precision", "fp32", "--quiet", "--progress=false", *extra]


def numbers(out):
    """{relative path: result.json} of every run and pair."""
    return {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted(Path(out).rglob("result.json"))}


def same_results(a, b, where):
    """Scores and counts equal; train losses (the pairs' history) within the loss tolerance."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            same_results(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_results(x, y, f"{where}[{i}]")
    elif isinstance(a, str):
        assert a.replace("/one/", "/") == b.replace("/two/", "/"), where
    elif isinstance(a, float) and where.endswith("[2]"):  # a train loss in a history line
        assert abs(a - b) <= 1e-4 * abs(a), where
    else:
        assert a == b, (where, a, b)


def test_the_study_batched_equals_the_study_one_run_at_a_time(quiet_backbone, tiny_tasks, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_study.main(study_args(quiet_backbone, tiny_tasks, one, "--batch_runs", "1")) == 0
    assert run_study.main(study_args(quiet_backbone, tiny_tasks, two, "--batch_runs", "3")) == 0
    a, b = numbers(one), numbers(two)
    # sources, (random + 5 inits) x 2 seeds x 3 targets but csqa2 has no manual group, pairs
    assert set(a) == set(b) and len(a) == 3 + 2 * (6 * 3 - 1) + 6
    for path in a:
        same_results(a[path], b[path], path)
    assert (one / "report.csv").read_text() == (two / "report.csv").read_text()
    # the runs' records do not hold batch_runs: the same run batched or not is the same run (they differ
    # only in the checksums of the deltas the study made before them, equal up to float rounding)
    made = ("train_checkpoint", "source_checkpoint", "test_checkpoint")
    for rec in sorted(one.rglob("run.json")):
        other = json.loads((two / rec.relative_to(one)).read_text())
        assert "batch_runs" not in rec.read_text()
        assert {k: v for k, v in json.loads(rec.read_text()).items() if k not in made} == \
            {k: v for k, v in other.items() if k not in made}
    # a rerun with another group size trains nothing and gives the same report
    log = (one / "log.txt").read_text()
    assert run_study.main(study_args(quiet_backbone, tiny_tasks, one, "--batch_runs", "4")) == 0
    new_log = (one / "log.txt").read_text()[len(log):]
    assert "already done" in new_log and "train loss" not in new_log and "resuming" not in new_log
    assert (one / "report.csv").read_text() == (two / "report.csv").read_text()


def test_tune_all_batched_equals_one_pair_at_a_time(quiet_backbone, tiny_tasks, tmp_path, capsys):
    sources = tmp_path / "sources"
    for task in TINY_TASKS:  # any deltas will do as sources
        base, _ = load_backbone(quiet_backbone)
        config = CONFIGS["lora"]
        dm.save_delta(sources / task / "checkpoint-best.safetensors",
                      initial_delta_state(base, config, 40 + TINY_TASKS.index(task)), config)
    common = ["--model", str(quiet_backbone), "--tokenizer_path", str(quiet_backbone), "--task_dir", str(tiny_tasks),
              "--train_checkpoint", str(sources), "--tune_method", "lora", "--lora_r", "2", "--lora_alpha", "4",
              "--train_iters", "6", "--valid_interval", "4", "--log_interval", "4", "--learning_rate_list", "0.01",
              "--predict_batch_size", "16", "--max_output_length", "8", "--do_predict", "--device", "cpu",
              "--precision", "fp32", "--quiet", "--progress=false"]
    assert tune_all_ckpt.main([*common, "--output_dir", str(tmp_path / "one"), "--batch_runs", "1"]) == 0
    assert tune_all_ckpt.main([*common, "--output_dir", str(tmp_path / "two"), "--batch_runs", "4"]) == 0
    assert (tmp_path / "one" / "result.tsv").read_text() == (tmp_path / "two" / "result.tsv").read_text()
    a, b = numbers(tmp_path / "one"), numbers(tmp_path / "two")
    assert len(a) == 6 and set(a) == set(b)
    for path in a:
        same_results(a[path], b[path], path)
    for last in sorted((tmp_path / "one").rglob("checkpoint-last.safetensors")):
        x, y = load_file(str(last)), load_file(str(tmp_path / "two" / last.relative_to(tmp_path / "one")))
        assert all(close(x[k], y[k]) for k in x)
    assert not list((tmp_path / "two").rglob("resume.safetensors"))  # removed once each pair is done


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_a_bad_batch_runs_is_one_line(tiny_tasks, tmp_path, capsys, value):
    assert run_study.main(["--output_dir", str(tmp_path), "--tasks", *TINY_TASKS, "--target_task_dir", str(tiny_tasks),
                           "--source_task_dir", str(tiny_tasks), "--batch_runs", value]) == 1
    err = capsys.readouterr().err
    assert f"--batch_runs must be auto or a whole number >= 1, not '{value}'" in err and "Traceback" not in err


def test_the_gpu_benchmark_runs_as_a_smoke_test_on_the_cpu():
    import subprocess

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_batched_runs.py"), "--device", "cpu", "--tiny",
                           "--methods", "lora", "--ks", "1", "3", "--precision", "fp32"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    figures = dict(line.split(": ") for line in proc.stdout.splitlines() if line and not line.startswith("#"))
    for name in ("lora_k1_runs_per_s", "lora_k3_runs_per_s", "lora_k3_runs_per_s_speedup", "lora_k3_train_speedup",
                 "lora_k3_decode_speedup", "lora_k3_mfu_of_measured_peak"):
        assert float(figures[name]) > 0, name

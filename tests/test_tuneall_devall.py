"""tune_all_ckpt.py, dev_all_ckpt.py and the Cosine / Euclidean / Performance weightings: the score
functions against hand numpy computations, then one tiny study end to end."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import delta_modules as dm
from conftest import REPO
from pewe import delta_scores as S
from pewe import ensemble as E
from pewe import layout as L
from pewe import weights as W
from pewe.data import DataError
from pewe.layout import init_checkpoint_for as train_checkpoint_for

LORA = dm.DeltaConfig("lora", lora_r=2)
SHAPES = {"x.lora.A": (2, 3), "x.lora.B": (3, 2), "y.lora.A": (2, 5)}  # hand-made, sizes differ on purpose


def hand_delta(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def load_script(name, folder="unit_model"):
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def np_cos_mean(a, b):
    """Mean over tensors of the cosine of the flattened tensors, each tensor weighing the same."""
    x = {k: v.double().numpy().ravel() for k, v in a.items()}
    y = {k: v.double().numpy().ravel() for k, v in b.items()}
    cos = [np.dot(x[k], y[k]) / (np.linalg.norm(x[k]) * np.linalg.norm(y[k])) for k in a]
    return float(np.mean(cos))


def np_distance(a, b):
    """Sum over tensors of the Frobenius norm of the difference (the original's Euclidean score)."""
    return float(sum(np.linalg.norm(a[k].double().numpy() - b[k].double().numpy()) for k in a))


# --------------------------------------------------------------------------- the pure scores

def test_cosine_and_distance_by_hand():
    a, b = hand_delta(1), hand_delta(2)
    assert S.delta_cosine(a, b) == pytest.approx(np_cos_mean(a, b), abs=1e-12)
    assert S.delta_cosine(a, a) == pytest.approx(1.0, abs=1e-12)
    assert S.delta_cosine(a, {k: -v for k, v in a.items()}) == pytest.approx(-1.0, abs=1e-12)
    # per-tensor mean, not the cosine of the concatenation (they differ for these tensors)
    cat = lambda d: np.concatenate([d[k].double().numpy().ravel() for k in d])
    whole = np.dot(cat(a), cat(b)) / (np.linalg.norm(cat(a)) * np.linalg.norm(cat(b)))
    assert abs(S.delta_cosine(a, b) - whole) > 1e-3
    zero = {k: torch.zeros_like(v) for k, v in a.items()}
    assert S.delta_cosine(a, zero) == 0.0  # as torch's CosineSimilarity, not NaN

    assert S.delta_distance(a, b) == pytest.approx(np_distance(a, b), rel=1e-12)
    assert S.delta_distance(a, a) == 0.0
    # a sum of per-tensor norms, not the norm of the concatenated difference
    assert S.delta_distance(a, b) > np.linalg.norm(cat(a) - cat(b)) + 1e-3
    with pytest.raises(dm.DeltaError, match="different tensors"):
        S.delta_distance(a, {k: v for k, v in b.items() if k != "y.lora.A"})
    with pytest.raises(dm.DeltaError, match="has shape"):
        S.delta_cosine(a, {**b, "x.lora.A": torch.zeros(3, 2)})


def test_performance_gain_by_hand():
    tuned = {"t1": {"t2": 0.75, "t3": 0.5}, "t2": {"t1": 0.25, "t3": 1.0}}
    zero = {"t1": {"t2": 0.5, "t3": 0.625, "t1": 0.9}, "t2": {"t1": 0.0, "t3": 0.5}}
    got = S.performance_scores(tuned, zero, ["t1", "t2"], ["t1", "t2", "t3"])
    assert got == {"t1": {"t2": 0.25, "t3": -0.125}, "t2": {"t1": 0.25, "t3": 0.5}}
    assert S.performance_gain(0.75, 0.5) == 0.25
    with pytest.raises(DataError, match="no zero-shot score of source t3 on target t2"):
        S.performance_scores(tuned, {"t1": zero["t1"], "t2": {"t1": 0.0}}, ["t1", "t2"], ["t1", "t2", "t3"])


def test_score_matrices_stream_files(tmp_path):
    tasks = ["t1", "t2", "t3"]
    src = {t: hand_delta(10 + i) for i, t in enumerate(tasks)}
    rnd = {t: hand_delta(20 + i) for i, t in enumerate(tasks)}
    for t in tasks:
        dm.save_delta(tmp_path / "src" / t / "checkpoint-best.safetensors", src[t], LORA)
        dm.save_delta(tmp_path / "rnd" / t / "checkpoint-best.safetensors", rnd[t], LORA)
    tuned = {}
    for t in tasks:
        for s in tasks:
            if s != t:
                tuned[t, s] = hand_delta(100 + 10 * tasks.index(t) + tasks.index(s))
                dm.save_delta(tmp_path / "tuned" / t / s / "checkpoint-best.safetensors", tuned[t, s], LORA)
    sources = L.source_checkpoints(tmp_path / "src", tasks)
    cos = S.cosine_scores(L.source_checkpoints(tmp_path / "rnd", tasks), sources, expect_method="lora")
    dist = S.euclidean_scores(sources, tmp_path / "tuned", tasks, "best", expect_method="lora")
    for t in tasks:
        assert list(cos[t]) == tasks and list(dist[t]) == [s for s in tasks if s != t]
        for s in tasks:
            assert cos[t][s] == pytest.approx(np_cos_mean(rnd[t], src[s]), abs=1e-12)
            if s != t:
                assert dist[t][s] == pytest.approx(np_distance(src[s], tuned[t, s]), rel=1e-12)
    E.write_score_file(tmp_path, dist, "Euclidean")
    assert L.read_similarity(tmp_path / "result.tsv") == dist  # repr round-trips every float
    with pytest.raises(dm.DeltaError, match="a lora delta, but delta = adapter"):
        S.euclidean_scores(sources, tmp_path / "tuned", tasks, expect_method="adapter")
    with pytest.raises(dm.DeltaError, match="run tune_all_ckpt.py for target t1, source t2"):
        S.euclidean_scores(sources, tmp_path / "tuned", tasks, "last")


# --------------------------------------------------------------------------- a tiny study end to end

FAST = ["--predict_batch_size", "16", "--max_output_length", "8", "--precision", "fp32", "--quiet",
        "--progress=false"]
ADAPTER = ["--tune_method", "adapter", "--apply_adapter", "--adapter_size", "4"]
TASKS = ["babi-qa1", "babi-qa6", "csqa2"]


def run(script, *args, cwd=REPO):
    # one thread: on shared busy cores, two-thread generation of a tiny model spends most time spinning
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)
    assert proc.returncode == 0, f"{script} exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def tune_all_args(study, keep_resume=True):
    return ["--model", study["backbone"], "--tokenizer_path", study["backbone"], "--task_dir", study["tasks"],
            "--train_checkpoint", study["sources"], "--output_dir", study["tune_all"], *ADAPTER, *FAST,
            "--train_iters", "10", "--valid_interval", "4", "--log_interval", "4", "--learning_rate_list", "3e-2",
            *(["--keep_resume"] if keep_resume else [])]


@pytest.fixture(scope="module")
def study(tiny_backbone, tiny_tasks, tmp_path_factory):
    """Three source deltas (20 updates each), tune_all (10 updates per pair) and dev_all on them."""
    root = tmp_path_factory.mktemp("study")
    st = {"backbone": tiny_backbone, "tasks": tiny_tasks, "sources": root / "sources", "tune_all": root / "tune_all",
          "dev_all": root / "dev_all", "root": root}
    run(REPO / "tune_hps_singletask.py", "--do_train", "--model", tiny_backbone, "--tokenizer_path", tiny_backbone,
        "--task_dir", tiny_tasks, "--output_dir", st["sources"], *ADAPTER, *FAST, "--train_iters", "20",
        "--valid_interval", "10", "--log_interval", "10")
    st["tune_all_stdout"] = run(REPO / "tune_all_ckpt.py", *tune_all_args(st)).stdout
    run(REPO / "dev_all_ckpt.py", "--model", tiny_backbone, "--tokenizer_path", tiny_backbone, "--task_dir", tiny_tasks,
        "--test_checkpoint", st["sources"], "--output_dir", st["dev_all"], *ADAPTER, *FAST)
    return st


def read_tensors(path):
    return dm.read_delta(path)[0]


def adapter_model(backbone):
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(str(backbone))
    return dm.attach_delta(model, dm.DeltaConfig("adapter", adapter_size=4))


def pairs():
    return [(t, s) for t in TASKS for s in TASKS if s != t]


def test_tune_all_keeps_best_and_last_per_pair_and_skips_on_rerun(study):
    out = study["tune_all"]
    model = adapter_model(study["backbone"])
    for t, s in pairs():
        d = out / t / s
        r = json.loads((d / "result.json").read_text())
        assert (r["target"], r["source"], r["updates"], r["best_step"] in (4, 8)) == (t, s, 10, True)
        assert [h[0] for h in r["history"]] == [4, 8]  # validations; the last delta (10) was scored apart
        last, _, meta = dm.read_delta(d / "checkpoint-last.safetensors")
        assert meta["step"] == 10 and meta["dev_score"] == r["last_dev_score"] and meta["task"] == t
        resume = {k[6:]: v for k, v in load_file(str(d / "resume.safetensors")).items() if k.startswith("delta.")}
        assert all(torch.equal(last[k], resume[k]) for k in last)
        source, _, _ = dm.read_delta(study["sources"] / s / "checkpoint-best.safetensors")
        assert S.delta_distance(source, last) > 0  # tuned from the source, and moved
        _, _, best_meta = dm.read_delta(d / "checkpoint-best.safetensors")
        assert best_meta["dev_score"] == r["dev_score"] and best_meta["init"].endswith(f"{s}/checkpoint-best.safetensors")
        dm.load_delta(model, d / "checkpoint-last.safetensors")
    table = L.read_similarity(out / "result.tsv")
    assert {t: set(row) for t, row in table.items()} == {t: set(TASKS) - {t} for t in TASKS}
    assert "results:" in study["tune_all_stdout"]

    # rerun: finished pairs are skipped; a pair whose result.json is lost (killed after its last
    # update) finishes from its resume state without training again, with the same numbers
    before = (out / "result.tsv").read_text()
    mtime = (out / "babi-qa1" / "csqa2" / "checkpoint-last.safetensors").stat().st_mtime_ns
    lost = out / "babi-qa6" / "csqa2"
    old_result, old_last = (lost / "result.json").read_text(), read_tensors(lost / "checkpoint-last.safetensors")
    (lost / "result.json").unlink()
    updates_logged = (out / "log.txt").read_text().count("train loss")
    run(REPO / "tune_all_ckpt.py", *tune_all_args(study, keep_resume=False))
    assert (out / "log.txt").read_text().count("train loss") == updates_logged == 2 * len(pairs())  # no update ran
    assert (out / "log.txt").read_text().count("already done") == len(pairs()) - 1
    assert (out / "result.tsv").read_text() == before
    assert (out / "babi-qa1" / "csqa2" / "checkpoint-last.safetensors").stat().st_mtime_ns == mtime
    assert (lost / "result.json").read_text() == old_result
    assert all(torch.equal(v, old_last[k]) for k, v in read_tensors(lost / "checkpoint-last.safetensors").items())
    assert not (lost / "resume.safetensors").exists()  # removed once the pair is done (keep_resume off)


def test_dev_all_writes_zero_shot_scores_in_the_similarity_layout(study):
    out = study["dev_all"]
    table = L.read_similarity(out / "result.tsv")
    assert list(table) == sorted(TASKS) and all(set(row) == set(TASKS) - {t} for t, row in table.items())
    assert json.loads((out / "result.json").read_text()) == table
    assert all(0 <= x <= 1 for row in table.values() for x in row.values())
    assert json.loads((out / "csqa2" / "result.json").read_text()) == table["csqa2"]


def check_outputs(save, model, scores, metric):
    """Every target's averaged delta loads into a real model, result.tsv holds the scores."""
    assert L.read_similarity(save / "result.tsv") == scores
    meta = json.loads((save / "scores.json").read_text())  # unit_model_others.py can reuse result.tsv
    assert meta["metric"] == metric and meta["higher_is_more_similar"] == (metric != "Euclidean")
    assert W.file_sign(save / "result.tsv", metric) == W.metric_sign(metric)
    for t in TASKS:
        ckpt = train_checkpoint_for(save, t)
        assert ckpt == save / f"without_{t}_checkpoint.safetensors"
        dm.load_delta(model, ckpt)
    assert (save / "hot_pic_all.png").stat().st_size > 0 and (save / "weights.csv").is_file()


def test_unit_models_cos_euclidean_performance(study, tmp_path):
    model = adapter_model(study["backbone"])
    common = [f"--source_ckpt_path={study['sources']}", "--delta=adapter"]
    src = {t: read_tensors(study["sources"] / t / "checkpoint-best.safetensors") for t in TASKS}

    # Cosine, run from its own folder as the original's README does; the sources double as the
    # "tuned from random init" deltas here, so each target's own source scores 1
    save = tmp_path / "Cosine"
    r = run("unit_model_cos.py", *common, f"--random_tuned_ckpt_path={study['sources']}", f"--save_ckpt_path={save}",
            cwd=REPO / "unit_model")
    assert str(save) in r.stdout
    cos = {t: {s: np_cos_mean(src[t], src[s]) for s in TASKS} for t in TASKS}
    got = L.read_similarity(save / "result.tsv")
    for t in TASKS:
        assert got[t][t] == pytest.approx(1.0) and all(got[t][s] == pytest.approx(cos[t][s], abs=1e-9) for s in TASKS)
    check_outputs(save, model, got, "Cosine")

    # Euclidean: distance from each source to its best tuned version; the sources are averaged
    save = tmp_path / "Euclidean"
    assert load_script("unit_model_Euclidean").main([*common, f"--tuned_ckpt_path={study['tune_all']}",
                                                     f"--save_ckpt_path={save}"]) == 0
    tuned = {(t, s): read_tensors(study["tune_all"] / t / s / "checkpoint-best.safetensors") for t, s in pairs()}
    got = L.read_similarity(save / "result.tsv")
    for t in TASKS:
        others = [s for s in TASKS if s != t]
        dist = np.array([np_distance(src[s], tuned[t, s]) for s in others])
        np.testing.assert_allclose([got[t][s] for s in others], dist, rtol=1e-9)
        avg, _, meta = dm.read_delta(save / f"without_{t}_checkpoint.safetensors")
        w = np_softmax(-dist / 0.1)
        np.testing.assert_allclose([meta["weights"][s] for s in others], w, rtol=1e-9)
        for k in avg:
            expect = sum(wi * src[s][k].double().numpy() for wi, s in zip(w, others))
            np.testing.assert_allclose(avg[k].numpy(), expect, rtol=1e-5, atol=1e-6)
    check_outputs(save, model, got, "Euclidean")

    # Performance: tuned best dev minus zero-shot dev; as the original, the tuned deltas are averaged
    save = tmp_path / "Performance"
    assert load_script("unit_model_Performance").main([*common, f"--tuned_ckpt_path={study['tune_all']}",
                                                       f"--zero_shot_path={study['dev_all'] / 'result.tsv'}",
                                                       f"--save_ckpt_path={save}", "--tem=0.5"]) == 0
    zero = L.read_similarity(study["dev_all"] / "result.tsv")
    got = L.read_similarity(save / "result.tsv")
    for t in TASKS:
        others = [s for s in TASKS if s != t]
        dev = [json.loads((study["tune_all"] / t / s / "result.json").read_text())["dev_score"] for s in others]
        gain = np.array(dev) - np.array([zero[t][s] for s in others])
        assert [got[t][s] for s in others] == gain.tolist()
        avg, _, meta = dm.read_delta(save / f"without_{t}_checkpoint.safetensors")
        w = np_softmax(gain / 0.5)
        assert meta["averaged"] == "tuned"
        for k in avg:
            expect = sum(wi * tuned[t, s][k].double().numpy() for wi, s in zip(w, others))
            np.testing.assert_allclose(avg[k].numpy(), expect, rtol=1e-5, atol=1e-6)
    check_outputs(save, model, got, "Performance")


def test_defaults_are_repo_relative():
    runs = REPO / "runs" / "{delta}"
    cos, euc, perf = (load_script(n) for n in ("unit_model_cos", "unit_model_Euclidean", "unit_model_Performance"))
    assert (cos.tem, euc.tem, perf.tem) == (0.001, 0.1, 0.001)  # the paper's temperatures
    assert cos.random_tuned_ckpt_path == str(runs / "random") and cos.save_ckpt_path == str(runs / "init" / "Cosine")
    assert euc.tuned_ckpt_path == perf.tuned_ckpt_path == str(runs / "tune_all")
    assert perf.zero_shot_path == str(runs / "dev_all" / "result.tsv")
    assert euc.source_ckpt_path == str(runs / "sources") and perf.average == "tuned"
    tune_all = load_script("tune_all_ckpt", ".")
    assert (tune_all.train_iters, tune_all.valid_interval, tune_all.task_dir) == (200, 50, str(REPO / "data" / "fewshot"))


def test_bad_input_is_one_error_line(study, tmp_path, capsys):
    tune_all = load_script("tune_all_ckpt", ".")
    args = tune_all_args(study)
    bad = [*args[:args.index("--output_dir")], "--output_dir", tmp_path / "o", *args[args.index("--output_dir") + 2:]]
    assert tune_all.main([*map(str, bad), "--source_tasks", "babi-qa1", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {study['sources'] / 'nope'}: no delta checkpoint matching checkpoint-best*.safetensors"]
    assert not list((tmp_path / "o").glob("*/*/result.json"))

    dev_all = load_script("dev_all_ckpt", ".")
    assert dev_all.main(["--model", str(study["backbone"]), "--tokenizer_path", str(study["backbone"]),
                         "--task_dir", str(study["tasks"]), "--test_checkpoint", str(tmp_path / "none"),
                         "--output_dir", str(tmp_path / "d"), *ADAPTER, *FAST]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'none'}: no such folder of source deltas")

    for name, extra in (("unit_model_Euclidean", [f"--tuned_ckpt_path={study['tune_all']}"]),
                        ("unit_model_cos", [f"--random_tuned_ckpt_path={study['sources']}"])):
        save = tmp_path / name
        for tem in ("0", "-0.1"):
            assert load_script(name).main([f"--tem={tem}",
                                           f"--source_ckpt_path={study['sources']}", f"--save_ckpt_path={save}",
                                           *extra]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: temperature must be a positive") and not save.exists()
    save = tmp_path / "perf"
    assert load_script("unit_model_Performance").main([
                                                       f"--source_ckpt_path={study['sources']}",
                                                       f"--tuned_ckpt_path={tmp_path / 'missing'}",
                                                       f"--save_ckpt_path={save}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run tune_all_ckpt.py for target babi-qa1" in err[0] and not save.exists()


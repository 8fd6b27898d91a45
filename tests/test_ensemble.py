"""Weighted ensembling checked against independent numpy / torch computations (no training)."""
import csv
import importlib.util
import random
import struct
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, write_task
from delta_modules import DeltaConfig, DeltaError, read_delta, save_delta
from pewe import averaging as A
from pewe import ensemble as E
from pewe import layout as L
from pewe import weight_reports as R
from pewe import weights as W
from pewe.data import DataError
from pewe.layout import init_checkpoint_for as train_checkpoint_for

FIXTURE = REPO.parent / "shared" / "fixtures" / "delta_search_adapter_loss_32x32.txt"
# the task order of the fixture (its README): line 32*i + j = loss of source j on target i
QA32 = ["adversarialqa", "hotpot_qa", "superglue-record", "ai2_arc", "codah", "commonsense_qa", "cosmos_qa",
        "dream", "hellaswag", "openbookqa", "qasc", "quail", "quarel", "quartz-no_knowledge",
        "quartz-with_knowledge", "race-high", "race-middle", "sciq", "superglue-copa", "swag", "wino_grande",
        "wiqa", "boolq", "mc_taco", "eli5-askh", "eli5-asks", "eli5-eli5", "lama-conceptnet",
        "lama-google_re", "numer_sense", "search_qa", "web_questions"]
LORA = DeltaConfig("lora", lora_r=2)
SHAPES = {"encoder.block.0.layer.0.SelfAttention.q.lora.A": (2, 8),  # hand-made (r, in) / (out, r)
          "encoder.block.0.layer.0.SelfAttention.q.lora.B": (8, 2),
          "decoder.block.0.layer.1.EncDecAttention.v.lora.A": (2, 8)}


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def write_similarity(path, scores, target_order, source_order):
    """The original's layout: a target-name line, then its ``source,score`` lines."""
    lines = []
    for t in target_order:
        lines += [t] + [f"{s},{scores[t][s]}" for s in source_order]
    Path(path).write_text("\n".join(lines) + "\n")


def hand_delta(seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def make_sources(root, tasks, config=LORA, shapes=SHAPES):
    """``{root}/{task}/checkpoint-best.safetensors`` as tune_hps_singletask.py writes them."""
    out = {}
    for i, t in enumerate(tasks):
        out[t] = hand_delta(100 + i, shapes)
        save_delta(Path(root) / t / "checkpoint-best.safetensors", out[t], config, task=t)
    return out


def make_task_folders(root, tasks):
    for t in tasks:
        write_task(root, t, [("q", "a")], [("q", "a")], [("q", "a")])
    return Path(root)


def np_weighted(deltas, weights):
    """sum_s w_s * delta_s in float64, key by key."""
    keys = next(iter(deltas.values())).keys()
    return {k: sum(w * deltas[s][k].double().numpy() for s, w in weights.items()) for k in keys}


# --------------------------------------------------------------------------- the authors' Loss matrix

def test_real_loss_matrix_leave_one_out_weights(tmp_path):
    if not FIXTURE.is_file():
        pytest.skip(f"the original's 32x32 Loss fixture is not at {FIXTURE}")
    text = FIXTURE.read_text().split()  # the authors' numbers, written back verbatim
    loss = np.array([float(x) for x in text]).reshape(32, 32)  # (target, source)
    scores = {t: {s: text[32 * i + j] for j, s in enumerate(QA32)} for i, t in enumerate(QA32)}
    rng = random.Random(0)  # shuffled blocks and lines: only reading by name gets this right
    targets, sources = QA32[:], QA32[:]
    rng.shuffle(targets)
    rng.shuffle(sources)
    path = tmp_path / "result.tsv"
    write_similarity(path, scores, targets, sources)

    read = L.read_similarity(path)
    weights = W.loo_weights(read, QA32, W.metric_sign("Loss"), 0.1, targets=QA32)
    assert list(weights) == QA32
    for i, t in enumerate(QA32):
        others = [j for j in range(32) if j != i]
        expect = np_softmax(-loss[i, others] / 0.1)
        got = np.array([weights[t][QA32[j]] for j in others])
        assert t not in weights[t] and list(weights[t]) == [QA32[j] for j in others]
        np.testing.assert_allclose(got, expect, rtol=1e-12, atol=1e-300)
        assert abs(got.sum() - 1) < 1e-12


def test_metric_signs():
    lower_is_closer = ["Loss", "KL", "EL2N", "GraNd", "Euclidean"]
    assert all(W.metric_sign(m) == -1 for m in lower_is_closer)
    assert all(W.metric_sign(m) == 1 for m in ["Cosine_of_Logits_and_Labels", "Cosine", "Performance"])
    assert W.metric_sign("KL-divergence") == -1 and W.metric_sign("cosine of logits and labels") == 1
    with pytest.raises(W.EnsembleError, match="unknown metric"):
        W.metric_sign("Jaccard")
    # +1: the most similar (highest) score gets the largest weight
    w = W.loo_weights({"t": {"a": 0.9, "b": 0.1}}, ["t", "a", "b"], +1, 1.0)["t"]
    assert w["a"] > w["b"]


# --------------------------------------------------------------------------- averaging

def test_weighted_average_equals_independent_sum(tmp_path):
    deltas = make_sources(tmp_path, ["a", "b", "c"])
    weights = {"a": 0.2, "b": 0.5, "c": 0.3}
    tensors, config = A.weighted_average([(tmp_path / s / "checkpoint-best.safetensors", w) for s, w in weights.items()])
    expect = np_weighted(deltas, weights)
    assert config == LORA and set(tensors) == set(SHAPES)
    for k in SHAPES:
        assert tensors[k].dtype == torch.float32
        np.testing.assert_allclose(tensors[k].numpy(), expect[k], rtol=1e-6, atol=1e-6)


def test_average_streams_one_source_at_a_time(tmp_path, monkeypatch):
    tasks = ["a", "b", "c", "d", "e"]
    make_sources(tmp_path, tasks)
    alive, live_at_read, read = [], [], A.read_delta

    def tracking_read(path):  # how many earlier sources are still in memory when the next is read
        live_at_read.append(sum(r() is not None for r in alive))
        tensors, cfg, meta = read(path)
        alive.append(weakref.ref(next(iter(tensors.values()))))
        return tensors, cfg, meta

    monkeypatch.setattr(A, "read_delta", tracking_read)
    A.weighted_average([(tmp_path / t / "checkpoint-best.safetensors", 0.2) for t in tasks])
    assert len(live_at_read) == 5 and max(live_at_read) == 0


def test_one_source_at_weight_one_is_bitwise_unchanged(tmp_path):
    src = hand_delta(7)
    src["encoder.block.0.layer.0.SelfAttention.q.lora.A"][0, 0] = -0.0  # survives only if nothing is added
    save_delta(tmp_path / "s.safetensors", src, LORA)
    tensors, _ = A.weighted_average([(tmp_path / "s.safetensors", 1.0)])
    for k, v in src.items():
        assert torch.equal(tensors[k].view(torch.int32), v.view(torch.int32))


def test_manual_division_averages_exactly_its_group(tmp_path):
    tasks = ["a", "b", "c", "d", "e", "f"]
    deltas = make_sources(tmp_path / "src", tasks)
    ckpts = L.source_checkpoints(tmp_path / "src", tasks)
    weights = W.group_weights([["a", "b", "c"], "d+e"], tasks)
    assert set(weights) == {"a", "b", "c", "d", "e"}  # f is in no group: no output for it
    out = tmp_path / "out"
    E.write_ensemble(out, weights, ckpts, method="manual")
    for target, group in {"a": "bc", "b": "ac", "c": "ab"}.items():
        got, _, meta = read_delta(out / f"without_{target}_checkpoint.safetensors")
        expect = {k: (deltas[group[0]][k].double() + deltas[group[1]][k].double()).numpy() / 2 for k in SHAPES}
        for k in SHAPES:
            np.testing.assert_allclose(got[k].numpy(), expect[k], rtol=1e-6, atol=1e-7)
        assert meta["method"] == "manual" and meta["weights"] == {s: 0.5 for s in group}
    got, _, _ = read_delta(out / "without_d_checkpoint.safetensors")  # a pair: the other member itself
    assert all(torch.equal(got[k], deltas["e"][k]) for k in SHAPES)
    assert not (out / "without_f_checkpoint.safetensors").exists()
    with pytest.raises(W.EnsembleError, match="in group 1 and in group 2"):
        W.group_weights([["a", "b"], ["b", "c"]], tasks)
    with pytest.raises(W.EnsembleError, match="at least two"):
        W.group_weights([["a"]], tasks)


def test_average_of_all_is_the_plain_mean_of_the_others():
    w = W.average_weights(["a", "b", "c", "d"])
    assert w["b"] == {"a": 1 / 3, "c": 1 / 3, "d": 1 / 3}


# --------------------------------------------------------------------------- refusals

def test_refuses_deltas_with_different_configs_or_tensors(tmp_path):
    save_delta(tmp_path / "a.safetensors", hand_delta(1), LORA)
    save_delta(tmp_path / "b.safetensors", hand_delta(2), DeltaConfig("lora", lora_r=2, lora_alpha=32))
    with pytest.raises(DeltaError, match="b.safetensors"):
        A.weighted_average([(tmp_path / "a.safetensors", 0.5), (tmp_path / "b.safetensors", 0.5)])
    other = {**hand_delta(3), "encoder.block.0.layer.0.SelfAttention.q.lora.B": torch.zeros(8, 3)}
    save_delta(tmp_path / "c.safetensors", other, LORA)
    with pytest.raises(DeltaError, match=r"c.safetensors: .*lora.B has shape \(8, 3\)"):
        A.weighted_average([(tmp_path / "a.safetensors", 0.5), (tmp_path / "c.safetensors", 0.5)])
    with pytest.raises(W.EnsembleError, match="not finite"):
        A.weighted_average([(tmp_path / "a.safetensors", float("nan"))])
    with pytest.raises(DeltaError, match="delta = adapter"):
        A.weighted_average([(tmp_path / "a.safetensors", 1.0)], expect_method="adapter")


def test_refuses_a_missing_source(tmp_path):
    make_sources(tmp_path, ["a"])
    with pytest.raises(DeltaError, match=str(tmp_path / "zz")):
        L.source_checkpoints(tmp_path, ["a", "zz"])
    with pytest.raises(W.EnsembleError, match="target t has no score for source.*b"):
        W.loo_weights({"t": {"a": 1.0}}, ["t", "a", "b"], -1, 0.1)


@pytest.mark.parametrize("t", [0, -0.1, float("nan"), float("inf")])
def test_refuses_a_bad_temperature(t):
    with pytest.raises(W.EnsembleError, match="temperature"):
        W.loo_weights({"t": {"a": 1.0, "b": 2.0}}, ["a", "b"], -1, t)


@pytest.mark.parametrize("bad, what", [("b,nan", "is nan"), ("b,-inf", "is -inf"), ("b,abc", "not a number"),
                                       ("b,0.1,2", "expected 'source,score'"), (",0.3", "expected 'source,score'"),
                                       ("b 0.2", "expected a target name"), ("0.25", "expected a target name")])
def test_refuses_a_malformed_similarity_line_naming_file_and_line(tmp_path, bad, what):
    path = tmp_path / "result.tsv"
    path.write_text(f"t\na,0.5\n{bad}\nc,0.1\n")
    with pytest.raises(DataError, match=f"{path}:3: .*{what}"):
        L.read_similarity(path)
    path.write_text("a,0.5\nt\n")
    with pytest.raises(DataError, match=f"{path}:1: a source,score line before"):
        L.read_similarity(path)


# --------------------------------------------------------------------------- outputs

def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_heat_map_grows_with_n_and_weights_csv_sums_to_one(tmp_path):
    sizes = []
    for n in (3, 40):
        tasks = [f"task-{i:02d}_long-name" for i in range(n)]
        rng = np.random.default_rng(n)
        scores = {t: {s: float(rng.uniform(0, 5)) for s in tasks} for t in tasks}
        weights = W.loo_weights(scores, tasks, -1, 0.5)
        R.plot_heat_map(tmp_path / f"hot_{n}.png", weights, tasks)
        sizes.append(png_size(tmp_path / f"hot_{n}.png"))
        assert np.isnan(np.diag(R.weight_matrix(weights, tasks))).all()
        R.write_weights_csv(tmp_path / f"w_{n}.csv", weights, tasks, scores)
        with open(tmp_path / f"w_{n}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == n * (n - 1) and all(r["source"] != r["target"] for r in rows)
        for t in tasks:
            assert abs(sum(float(r["weight"]) for r in rows if r["target"] == t) - 1) < 1e-12
        assert float(rows[0]["score"]) == scores[rows[0]["target"]][rows[0]["source"]]
    assert sizes[1][0] > sizes[0][0] and sizes[1][1] > sizes[0][1]


# --------------------------------------------------------------------------- the unit_model scripts

def tiny_lora_model():
    from transformers import T5Config, T5ForConditionalGeneration
    from delta_modules import attach_delta

    cfg = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2,
                   feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return attach_delta(T5ForConditionalGeneration(cfg), LORA)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Task folders t1..t4, their source deltas (real LoRA keys of a tiny T5), a Loss result.tsv."""
    from delta_modules import delta_state_dict

    root = tmp_path_factory.mktemp("study")
    tasks = ["t1", "t2", "t3", "t4"]
    make_task_folders(root / "data", tasks)
    shapes = {k: tuple(v.shape) for k, v in delta_state_dict(tiny_lora_model()).items()}
    deltas = make_sources(root / "sources", tasks, LORA, shapes)
    rng = np.random.default_rng(1)
    scores = {t: {s: float(rng.uniform(0, 3)) for s in tasks} for t in tasks}
    write_similarity(root / "result.tsv", scores, tasks, tasks)
    return root, tasks, deltas, scores


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "unit_model" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unit_model_others_end_to_end(study, tmp_path):
    from delta_modules import load_delta

    root, tasks, deltas, scores = study
    out = tmp_path / "init"
    r = subprocess.run([sys.executable, "unit_model_others.py", f"--source_ckpt_path={root / 'sources'}", f"--origin_data_path={root / 'result.tsv'}",
                        f"--save_ckpt_path={out}", "--tem=0.5", "--metric=Loss", "--delta=lora"],
                       cwd=REPO / "unit_model", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    lines = (out / "final_weight.txt").read_text().splitlines()
    assert lines[0] == "t1" and len(lines) == 8
    model = tiny_lora_model()
    for i, t in enumerate(tasks):
        others = [s for s in tasks if s != t]
        w = np_softmax(-np.array([scores[t][s] for s in others]) / 0.5)
        np.testing.assert_allclose(eval(lines[2 * i + 1]), w, rtol=1e-12)  # the original's list line
        ckpt = train_checkpoint_for(out, t)
        assert ckpt == out / f"without_{t}_checkpoint.safetensors"
        meta = load_delta(model, ckpt)  # every key and shape fits a real LoRA model
        assert meta["metric"] == "Loss" and meta["temperature"] == 0.5 and meta["method"] == "softmax"
        expect = np_weighted(deltas, dict(zip(others, w)))
        for k, p in model.named_parameters():
            if k in expect:
                np.testing.assert_allclose(p.detach().numpy(), expect[k], rtol=1e-5, atol=1e-6)
    assert png_size(out / "hot_pic_all.png")[0] > 0


def test_unit_model_others_block_folder(study, tmp_path):
    root, tasks, deltas, scores = study
    sims = tmp_path / "sims"
    sims.mkdir()
    for b in range(2):
        write_similarity(sims / f"block_{b}_result.tsv", {t: {s: v * (b + 1) for s, v in row.items()}
                                                          for t, row in scores.items()}, tasks, tasks)
    (sims / "notes.txt").write_text("not a similarity file")
    out = tmp_path / "init"
    rc = load_script("unit_model_others").main([f"--origin_data_path={sims}",
                                                f"--source_ckpt_path={root / 'sources'}", f"--save_ckpt_path={out}",
                                                "--delta=lora", "--task_list", "t1", "t2", "t3"])
    assert rc == 0
    for b in range(2):
        d = out / f"block_{b}_result"
        assert sorted(p.name for p in d.glob("*.safetensors")) == [f"without_{t}_checkpoint.safetensors"
                                                                   for t in ("t1", "t2", "t3")]
        _, _, meta = read_delta(d / "without_t1_checkpoint.safetensors")
        w = np_softmax(-np.array([scores["t1"]["t2"], scores["t1"]["t3"]]) * (b + 1) / 0.1)
        np.testing.assert_allclose([meta["weights"]["t2"], meta["weights"]["t3"]], w, rtol=1e-12)


def test_unit_model_average_end_to_end(study, tmp_path):
    root, tasks, deltas, _ = study
    out = tmp_path / "manual"
    r = subprocess.run([sys.executable, str(REPO / "unit_model" / "unit_model_average.py"),
                        f"--source_ckpt_path={root / 'sources'}",
                        f"--save_ckpt_path={out}", "--delta=lora", "--groups", "t1 t2 t3", "t4+t2"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["error: task t2 is in group 1 and in group 2"]
    r = subprocess.run([sys.executable, str(REPO / "unit_model" / "unit_model_average.py"),
                        f"--source_ckpt_path={root / 'sources'}",
                        f"--save_ckpt_path={out}", "--delta=lora", "--groups", "t1 t2 t3"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got, _, meta = read_delta(train_checkpoint_for(out, "t2"))
    expect = np_weighted(deltas, {"t1": 0.5, "t3": 0.5})
    for k in expect:
        np.testing.assert_allclose(got[k].numpy(), expect[k], rtol=1e-6, atol=1e-7)
    assert meta["method"] == "manual" and not list(out.glob("without_t4_*"))

    out = tmp_path / "all"  # average of all, in process
    assert load_script("unit_model_average").main(["--delta=lora",
                                                   f"--source_ckpt_path={root / 'sources'}",
                                                   f"--save_ckpt_path={out}"]) == 0
    got, _, _ = read_delta(train_checkpoint_for(out, "t4"))
    expect = np_weighted(deltas, {s: 1 / 3 for s in ("t1", "t2", "t3")})
    for k in expect:
        np.testing.assert_allclose(got[k].numpy(), expect[k], rtol=1e-6, atol=1e-7)
    with open(out / "weights.csv") as f:
        assert len(list(csv.DictReader(f))) == 12


def test_scripts_defaults_are_repo_relative_and_errors_are_one_line(study, tmp_path, capsys):
    root, tasks, _, _ = study
    others = load_script("unit_model_others")
    assert others.source_ckpt_path == str(REPO / "runs" / "{delta}" / "sources")
    # origin_data_path is the similarity file, as in the original (no separate sim_path)
    assert others.origin_data_path == str(REPO / "runs" / "{delta}" / "similarity" / "{metric}" / "result.tsv")
    assert not hasattr(others, "sim_path")
    # task folders without any source checkpoint under the default runs/adapter/sources
    make_task_folders(tmp_path / "data", ["no-such-task-a", "no-such-task-b"])
    (tmp_path / "sim.tsv").write_text("t1\nt2,0.1\n")
    assert others.main([f"--origin_data_path={tmp_path / 'sim.tsv'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {REPO / 'runs' / 'adapter' / 'sources'}")
    # a non-finite score: one line naming file and line, nothing written
    bad = tmp_path / "bad.tsv"
    bad.write_text("t1\nt2,inf\n")
    out = tmp_path / "never"
    assert others.main([f"--source_ckpt_path={root / 'sources'}",
                        f"--origin_data_path={bad}", f"--save_ckpt_path={out}", "--delta=lora"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: score of source t2 for target t1 is inf"
    assert not out.exists()
    assert others.main([f"--source_ckpt_path={root / 'sources'}",
                        f"--origin_data_path={root / 'result.tsv'}", f"--save_ckpt_path={out}", "--tem=0"]) == 1
    assert "temperature" in capsys.readouterr().err and not out.exists()


def test_file_sign_follows_scores_json(tmp_path):
    import json as _json
    sim = tmp_path / "result.tsv"
    sim.write_text("a\nb,1.0\n")
    assert W.file_sign(sim, "Cosine_of_Logits_and_Labels") == 1  # no scores.json: the metric's own sign
    (tmp_path / "scores.json").write_text(_json.dumps({"metric": "Loss", "higher_is_more_similar": False}))
    assert W.file_sign(sim, "Loss") == -1
    with pytest.raises(W.EnsembleError, match="scores are Loss .*but metric = Cosine_of_Logits_and_Labels"):
        W.file_sign(sim, "Cosine_of_Logits_and_Labels")
    # the signs come from the score table, one source of truth
    from pewe.scores import SCORES
    assert all(W.metric_sign(n) == (1 if s.higher_is_more_similar else -1) for n, s in SCORES.items())


def test_effective_sources_counts_sources_whatever_the_weights_scale():
    from pewe.weights import effective_sources

    assert effective_sources([1.0]) == 1.0
    assert effective_sources([0.25] * 4) == pytest.approx(4.0)
    # weights summing to 1: 1 / sum w^2 = 1 / (0.25 + 0.09 + 0.04)
    assert effective_sources([0.5, 0.3, 0.2]) == pytest.approx(1 / (0.25 + 0.09 + 0.04))
    # LoraHub-style weights (small, signed): the same count as their normalised magnitudes
    assert effective_sources([0.07, -0.03, 0.02]) == pytest.approx(effective_sources([0.7, 0.3, 0.2]))
    assert effective_sources([0.05, 0.05]) == pytest.approx(2.0)  # 1 / sum w^2 would say 200

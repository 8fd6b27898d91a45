"""Task-similarity scores (pewe/similarity.py and get_similarity/get_*.py) on tiny tensors and a tiny T5."""
import json
import math
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_TASKS, write_task
from delta_modules import DeltaConfig, attach_delta, delta_state_dict, save_delta
from pewe import layout as L
from pewe import similarity as sim
from pewe.scores import SCORES, TokenOutputs
from pewe.similarity import ScoreOptions, SimilarityEngine, SimilarityError

sys.path.insert(0, str(REPO / "get_similarity"))

FWD = ["Loss", "KL", "EL2N", "Cosine_of_Logits_and_Labels", "block"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on shared cores: one thread is many times faster than two (thread hand-offs dominate)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- hand computations

def _softmax(row):
    e = np.exp(row - row.max())
    return e / e.sum()


def _tokens(n=6, v=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TokenOutputs(torch.randn(n, v, generator=g) * 3, torch.randint(0, v, (n,), generator=g),
                        torch.randn(n, v, generator=g) * 3)


def test_token_scores_match_hand_loops():
    t = _tokens()
    logits, labels, ref = t.logits.double().numpy(), t.labels.numpy(), t.ref_logits.double().numpy()
    ce = el2n = cos = kl = 0.0
    for i in range(len(labels)):
        q, p, y = _softmax(logits[i]), _softmax(ref[i]), labels[i]
        ce += -math.log(q[y])
        onehot = np.zeros_like(q)
        onehot[y] = 1.0
        el2n += math.sqrt(sum((q[k] - onehot[k]) ** 2 for k in range(len(q))))
        cos += sum(q[k] * onehot[k] for k in range(len(q))) / (math.sqrt(sum(x * x for x in q)) * 1.0)
        kl += sum(p[k] * (math.log(p[k]) - math.log(q[k])) for k in range(len(q)))
    n = len(labels)
    assert SCORES["Loss"].reduction == "mean"
    assert float(SCORES["Loss"].fn(t)) / n == pytest.approx(ce / n, rel=1e-5)
    assert float(SCORES["EL2N"].fn(t)) == pytest.approx(el2n, rel=1e-5)
    assert float(SCORES["Cosine_of_Logits_and_Labels"].fn(t)) == pytest.approx(cos, rel=1e-5)
    assert float(SCORES["KL"].fn(t)) == pytest.approx(kl, rel=1e-5)
    assert float(SCORES["KL"].fn(TokenOutputs(t.logits, t.labels, t.logits))) == pytest.approx(0, abs=1e-5)


def test_signs_travel_with_the_scores():
    assert {n: s.higher_is_more_similar for n, s in SCORES.items()} == {
        "Loss": False, "KL": False, "EL2N": False, "Cosine_of_Logits_and_Labels": True, "GraNd": False,
        "block": True, "Cosine": True, "Euclidean": False, "Performance": True}


def test_block_cosine_matches_hand_loop():
    g = torch.Generator().manual_seed(1)
    h, ref = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    h[~mask] = 100.0  # padding must not count
    want = 0.0
    for i in range(3):
        a = np.concatenate([h[i, t].numpy() for t in range(5) if mask[i, t]]).astype(float)
        b = np.concatenate([ref[i, t].numpy() for t in range(5) if mask[i, t]]).astype(float)
        want += float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))
    assert float(SCORES["block"].fn(h, ref, mask)) == pytest.approx(want, rel=1e-5)


def test_grand_sums_per_batch_norms():
    got = SCORES["GraNd"].fn([{"": 9.0, "x": 4.0}, {"": 16.0, "x": 1.0}])
    assert got == pytest.approx({"": 3.0 + 4.0, "x": 2.0 + 1.0})


def test_grand_groups_and_order():
    g = sim.grand_group
    assert g("encoder.block.3.layer.1.DenseReluDense.adapter.down", "block") == "encoder_block_3"
    assert g("decoder.block.11.layer.1.EncDecAttention.q.lora.A", "layer") == "decoder_block_11_layer_1"
    assert g("encoder.prefix.embedding", "dev") == ""
    with pytest.raises(SimilarityError, match="prefix"):
        g("encoder.prefix.embedding", "block")
    names = ["decoder_block_0", "encoder_block_10", "encoder_block_2", "encoder_block_2_layer_1", ""]
    assert sorted(names, key=L.group_sort_key) == ["", "encoder_block_2", "encoder_block_2_layer_1",
                                                      "encoder_block_10", "decoder_block_0"]


# --------------------------------------------------------------------------- files

def test_result_file_layout_round_trips(tmp_path):
    groups = {"": {"t1": {"s1": 0.5, "s2": 1.25}, "t2": {"s1": -3e-9, "s2": 2.0}}}
    paths = sim.write_results(tmp_path, "Cosine_of_Logits_and_Labels", groups, ScoreOptions())
    assert [p.name for p in paths] == ["result.tsv"]
    assert (tmp_path / "result.tsv").read_text().splitlines() == ["t1", "s1,0.5", "s2,1.25", "t2", "s1,-3e-09",
                                                                   "s2,2.0"]
    assert L.read_similarity(tmp_path / "result.tsv") == groups[""]
    meta = json.loads((tmp_path / "scores.json").read_text())
    assert meta["metric"] == "Cosine_of_Logits_and_Labels" and meta["higher_is_more_similar"] is True
    assert meta["options"]["num_batches"] == 1
    sim.write_results(tmp_path / "b", "GraNd", {"decoder_block_0": groups[""], "encoder_block_0": groups[""]},
                      ScoreOptions())
    assert json.loads((tmp_path / "b" / "scores.json").read_text())["files"] == [
        "encoder_block_0_result.tsv", "decoder_block_0_result.tsv"]


# --------------------------------------------------------------------------- engine on a tiny T5

def _model(tiny_backbone, config):
    from pewe.model import load_backbone

    torch.manual_seed(0)
    model, tok = load_backbone(tiny_backbone, tiny_backbone, "cpu")
    attach_delta(model, config)
    return model, tok


def _perturb_and_save(model, path, seed):
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in delta_state_dict(model).items()}
    save_delta(path, state, model.delta_config)
    return path


@pytest.fixture(scope="module")
def adapter_engine(tiny_backbone, tiny_tasks):
    model, tok = _model(tiny_backbone, DeltaConfig("adapter", adapter_size=4))
    engine = SimilarityEngine(model, tok, torch.device("cpu"), ScoreOptions(batch_size=3, grand_dropout=False))
    return engine, engine.dev_batches(tiny_tasks, "babi-qa1")


def test_multi_answer_rows_get_their_own_labels(adapter_engine, tmp_path):
    engine, _ = adapter_engine
    write_task(tmp_path, "multi", [("x", "y")], [("q one", "a"), ("q two", "bb", "cc"), ("q three", "dd")],
               [("x", "y")])
    rows = sim.load_dev_rows(tmp_path, "multi", engine.tokenizer, engine.options)
    dec = engine.tokenizer.decode
    assert [dec(r, skip_special_tokens=True).split("] ")[1] for r in rows.input_ids] == [
        "q one", "q two", "q two", "q three"]
    assert [dec(r, skip_special_tokens=True).strip() for r in rows.label_ids] == ["a", "bb", "cc", "dd"]
    batch = engine.dev_batches(tmp_path, "multi")[1]  # batch size 3: the 4th row starts batch 2
    assert dec([t for t in batch["labels"][0].tolist() if t >= 0], skip_special_tokens=True).strip() == "dd"


def test_loss_equals_the_models_own_loss(adapter_engine):
    engine, batches = adapter_engine
    with torch.no_grad():
        engine.model.eval()
        want = engine.model(**engine._inputs(batches[0])).loss.item()
    got = engine.forward_scores(batches[:1], ["Loss"])["Loss"][""]
    assert got == pytest.approx(want, rel=1e-5)
    # several batches: the token mean over all of them
    toks = [int((b["labels"] != -100).sum()) for b in batches[:2]]
    with torch.no_grad():
        per = [engine.model(**engine._inputs(b)).loss.item() for b in batches[:2]]
    got2 = engine.forward_scores(batches[:2], ["Loss"])["Loss"][""]
    assert got2 == pytest.approx(sum(p * n for p, n in zip(per, toks)) / sum(toks), rel=1e-5)


def test_one_forward_pass_gives_the_same_scores_as_separate_passes(adapter_engine, tmp_path):
    engine, batches = adapter_engine
    ref_ckpt = _perturb_and_save(engine.model, tmp_path / "ref.safetensors", 1)
    src_ckpt = _perturb_and_save(engine.model, tmp_path / "src.safetensors", 2)
    refs = engine.reference(ref_ckpt, batches[:2], need_logits=True, need_hidden=True)
    from delta_modules import load_delta

    load_delta(engine.model, src_ckpt)
    calls = []
    handle = engine.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        together = engine.forward_scores(batches[:2], FWD, refs)
    finally:
        handle.remove()
    assert len(calls) == 2  # one forward per batch for all five scores
    for name in FWD:
        alone = engine.forward_scores(batches[:2], [name], refs)[name]
        assert together[name] == pytest.approx(alone, rel=1e-6), name
    assert set(together["block"]) == {f"{s}_block_{i}" for s in ("encoder", "decoder") for i in range(2)}
    assert together["KL"][""] > 0
    # against itself: KL 0 and every block cosine 1 per row
    same = engine.reference(src_ckpt, batches[:2], True, True)
    own = engine.forward_scores(batches[:2], ["KL", "block"], same)
    assert own["KL"][""] == pytest.approx(0, abs=1e-4)
    rows = sum(len(b["index"]) for b in batches[:2])
    assert all(v == pytest.approx(rows, rel=1e-5) for v in own["block"].values())


def _hand_grand(engine, batch):
    params = [p for _, p in engine.params]
    engine.model.eval()
    loss = engine.model(**engine._inputs(batch)).loss
    grads = torch.autograd.grad(loss, params)
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


@pytest.mark.parametrize("config", [DeltaConfig("adapter", adapter_size=4), DeltaConfig("lora", lora_r=2)],
                         ids=["adapter", "lora"])
def test_grand_parts_add_up_to_the_whole(tiny_backbone, tiny_tasks, tmp_path, config):
    model, tok = _model(tiny_backbone, config)
    from delta_modules import load_delta

    load_delta(model, _perturb_and_save(model, tmp_path / "d.safetensors", 3))  # LoRA B != 0
    engine = SimilarityEngine(model, tok, torch.device("cpu"), ScoreOptions(batch_size=3, grand_dropout=False))
    batches = engine.dev_batches(tiny_tasks, "babi-qa6")
    whole = engine.grand_scores(batches[:1], "dev")[""]
    assert whole == pytest.approx(_hand_grand(engine, batches[0]), rel=1e-5)
    for mode in ("block", "layer"):
        parts = engine.grand_scores(batches[:1], mode)
        assert sum(v * v for v in parts.values()) == pytest.approx(whole * whole, rel=1e-5)
    layers = set(engine.grand_scores(batches[:1], "layer"))
    if config.method == "adapter":  # houlsby: after self-attn, cross-attn and FFN
        assert len(layers) == 2 * 2 + 2 * 3
    else:  # LoRA on attention only: no FFN site
        assert layers == {f"encoder_block_{i}_layer_0" for i in range(2)} | {
            f"decoder_block_{i}_layer_{j}" for i in range(2) for j in (0, 1)}
    two = engine.grand_scores(batches[:2], "dev")[""]
    assert two == pytest.approx(_hand_grand(engine, batches[0]) + _hand_grand(engine, batches[1]), rel=1e-5)


def test_grand_with_dropout_is_repeatable_and_prefix_refuses_blocks(tiny_backbone, tiny_tasks):
    model, tok = _model(tiny_backbone, DeltaConfig("prefix", prefix_num=4, prefix_r=8))
    engine = SimilarityEngine(model, tok, torch.device("cpu"), ScoreOptions(batch_size=4, grand_dropout=True))
    batches = engine.dev_batches(tiny_tasks, "csqa2")
    first = engine.grand_scores(batches, "dev")[""]
    assert first > 0 and engine.grand_scores(batches, "dev")[""] == first
    with pytest.raises(SimilarityError, match="adapter and LoRA"):
        engine.grand_scores(batches[:1], "block")


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tuned(tiny_backbone, tiny_tasks, tmp_path_factory):
    """A delta tuned on each tiny task (these serve as the sources and as the random-init-tuned targets)."""
    import tune_hps_singletask

    out = tmp_path_factory.mktemp("tuned")
    rc = tune_hps_singletask.main([
        "--do_train", "--tune_method", "adapter", "--adapter_size", "8", "--task_dir", str(tiny_tasks),
        "--output_dir", str(out), "--model", str(tiny_backbone), "--tokenizer_path", str(tiny_backbone),
        "--train_iters", "120", "--valid_interval", "60", "--learning_rate_list", "1e-2",
        "--max_output_length", "8", "--predict_batch_size", "8", "--precision", "fp32", "--device", "cpu",
        "--quiet"])
    assert rc == 0
    return out


def _common(tiny_backbone, tiny_tasks, tuned, out):
    return ["--task_dir", str(tiny_tasks), "--source_checkpoint_path", str(tuned), "--output_dir", str(out),
            "--model", str(tiny_backbone), "--tokenizer_path", str(tiny_backbone), "--precision", "fp32",
            "--device", "cpu", "--quiet", "--predict_batch_size", "8"]


def test_end_to_end_loss_prefers_the_task_own_delta(tiny_backbone, tiny_tasks, tuned, tmp_path):
    import get_Loss

    # the original's command-line flags are accepted
    assert get_Loss.main(_common(tiny_backbone, tiny_tasks, tuned, tmp_path) + [
        "--do_train", "--do_predict", "--learning_rate_list", "5e-4", "--bsz_list", "8", "--warmup_steps", "200",
        "--tune_method", "adapter", "--apply_adapter", "--adapter_type", "houlsby", "--adapter_size", "8"]) == 0
    table = L.read_similarity(tmp_path / "result.tsv")
    assert list(table) == list(TINY_TASKS) and all(list(row) == list(TINY_TASKS) for row in table.values())
    own_best = [t for t, row in table.items() if min(row, key=row.get) == t]
    assert len(own_best) >= 2, table
    assert json.loads((tmp_path / "scores.json").read_text())["higher_is_more_similar"] is False


def test_end_to_end_every_entry_writes_its_files(tiny_backbone, tiny_tasks, tuned, tmp_path):
    import get_block
    import get_Cosine_of_Logits_and_Labels
    import get_EL2N
    import get_GraNd
    import get_KL_divergence

    common = lambda d: _common(tiny_backbone, tiny_tasks, tuned, tmp_path / d)  # noqa: E731
    ref = ["--random_tuned_ckpt_path", str(tuned)]
    assert get_KL_divergence.main(common("KL") + ref) == 0
    assert get_EL2N.main(common("EL2N")) == 0
    assert get_Cosine_of_Logits_and_Labels.main(common("cos")) == 0
    assert get_GraNd.main(common("GraNd")) == 0
    assert get_GraNd.main(common("GraNd_layer") + ["--mode", "layer", "--tasks", "csqa2"]) == 0
    assert get_block.main(common("block") + ref + ["--source_tasks", "babi-qa1", "csqa2"]) == 0
    kl = L.read_similarity(tmp_path / "KL" / "result.tsv")
    assert all(row[t] == pytest.approx(0, abs=1e-4) for t, row in kl.items())  # same delta as the reference
    for d in ("EL2N", "cos", "GraNd"):
        table = L.read_similarity(tmp_path / d / "result.tsv")
        assert list(table) == list(TINY_TASKS) and all(len(r) == 3 for r in table.values())
    assert json.loads((tmp_path / "cos" / "scores.json").read_text())["options"]["num_batches"] == 0
    layer = sorted(p.name for p in (tmp_path / "GraNd_layer").glob("*_result.tsv"))
    assert len(layer) == 10 and "decoder_block_1_layer_2_result.tsv" in layer
    assert L.read_similarity(tmp_path / "GraNd_layer" / "encoder_block_0_layer_1_result.tsv").keys() == {"csqa2"}
    blocks = sorted(p.name for p in (tmp_path / "block").glob("*_result.tsv"))
    assert blocks == sorted(f"{s}_block_{i}_result.tsv" for s in ("encoder", "decoder") for i in range(2))
    b = L.read_similarity(tmp_path / "block" / "decoder_block_1_result.tsv")
    assert b["csqa2"]["csqa2"] == pytest.approx(8, rel=1e-5)  # 8 dev rows, each cosine 1 with itself
    assert list(b["babi-qa1"]) == ["babi-qa1", "csqa2"]


def test_entry_failures_are_clean(tiny_backbone, tiny_tasks, tuned, tmp_path, capsys):
    import get_GraNd
    import get_KL_divergence
    import get_Loss

    common = _common(tiny_backbone, tiny_tasks, tuned, tmp_path)
    assert get_KL_divergence.main(common) == 1  # no --random_tuned_ckpt_path
    assert "random_tuned_ckpt_path" in capsys.readouterr().err
    assert get_Loss.main(common + ["--tune_method", "lora"]) == 1
    assert "adapter" in capsys.readouterr().err
    assert get_GraNd.main(common + ["--mode", "heads"]) == 1
    assert get_Loss.main(common + ["--source_checkpoint_path", str(tmp_path / "nowhere")]) == 1


def test_shell_script_runs_from_its_folder(tiny_backbone, tiny_tasks, tuned, tmp_path):
    import os
    import subprocess

    folder = REPO / "scripts" / "get_similarity"
    assert len(list(folder.glob("*.sh"))) == 18
    for script in folder.glob("*.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    env = {**os.environ, "PYTHON": sys.executable, "MODEL": str(tiny_backbone), "TASK_DIR": str(tiny_tasks),
           "SOURCES": str(tuned), "OUTPUT_DIR": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", "adapter_Loss.sh", "--precision", "fp32", "--device", "cpu", "--tasks", "csqa2"],
                         cwd=folder, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert list(L.read_similarity(tmp_path / "out" / "result.tsv")) == ["csqa2"]

"""The peers' ways of combining deltas (pewe.merges, pewe.lorahub, their initialisations in pewe.inits):
each rule against a hand computation and against the formulas of ../shared/PEERS.md (sections B, C),
LoraHub's search on a toy whose answer is known, determinism, the study's rows and the entry script."""
import csv
import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import run_study
from conftest import REPO, TINY_TASKS
from delta_modules import DeltaConfig, attach_delta, delta_state_dict, read_delta, save_delta
from pewe import lorahub as H
from pewe import merges as M
from pewe.inits import InitInputs, init_spec, parse_init_name, parse_merge_options
from pewe.scores import ScoreError

torch.set_num_threads(1)
P = M.check_merge_params({})


def inputs(target="a", sources=("a", "b", "c", "d"), scores=None, score="Loss", T=0.1, **kw):
    return InitInputs(target, tuple(sources), {}, {score: scores} if scores else {}, {score: (T, T)} if scores else {},
                      **kw)


# --------------------------------------------------------------------------- per-tensor rules by hand

def test_task_arithmetic_and_trim_by_hand():
    t = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])]
    got = M.task_arithmetic(t, [0.25, 0.5], {**P, "lambda": 2.0})
    assert got.tolist() == [2 * (0.25 + 1.5), 2 * (-0.5 + 2.0)]
    assert M.magnitude_trim(torch.tensor([3.0, -1.0, 0.5, -4.0]), 0.5).tolist() == [3.0, 0.0, 0.0, -4.0]
    assert M.magnitude_trim(torch.tensor([3.0, -1.0, 0.5, -4.0]), 0.1).tolist() == [0.0, 0.0, 0.0, -4.0]  # k >= 1


def test_ties_by_hand():
    """t1 = [4, -1, 2, -3], t2 = [-2, 3, 1, -1], w = (0.6, 0.4), density 0.5 (two entries kept each):
    trimmed [4, 0, 0, -3] and [-2, 3, 0, 0]; weighted [2.4, 0, 0, -1.8] and [-0.8, 1.2, 0, 0]; their sum
    [1.6, 1.2, 0, -1.8] elects + + + -; agreeing: t1 at 0 and 3, t2 at 1; the third entry is kept by
    nobody; disjoint mean [2.4/0.6, 1.2/0.4, 0, -1.8/0.6] = [4, 3, 0, -3]."""
    t = [torch.tensor([4.0, -1.0, 2.0, -3.0]), torch.tensor([-2.0, 3.0, 1.0, -1.0])]
    got = M.ties(t, [0.6, 0.4], {**P, "ties_density": 0.5})
    np.testing.assert_allclose(got.numpy(), [4.0, 3.0, 0.0, -3.0], rtol=1e-6)
    np.testing.assert_allclose(M.ties(t, [0.6, 0.4], {**P, "ties_density": 0.5, "lambda": 0.5}).numpy(),
                               [2.0, 1.5, 0.0, -1.5], rtol=1e-6)


def peers_ties(ts, ws, density, lam):
    """PEERS.md C.1 (mergekit ties): magnitude-trim each delta, weight it, elect the sign of the sum
    (>= 0: +), keep what agrees, divide by the agreeing weights (0 -> 1), times lambda; numpy, float64."""
    trimmed = []
    for t in ts:
        flat = t.reshape(-1)
        k = max(1, int(density * flat.size))
        keep = np.zeros(flat.size, bool)
        keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
        trimmed.append(np.where(keep, flat, 0.0).reshape(t.shape))
    weighted = np.stack([w * t for w, t in zip(ws, trimmed)])
    sign = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = np.sign(weighted) == sign
    divisor = (np.array(ws).reshape(-1, *[1] * ts[0].ndim) * mask).sum(0)
    divisor[np.abs(divisor) < 1e-8] = 1.0
    return lam * (weighted * mask).sum(0) / divisor


def test_ties_equals_the_peers_formula_on_random_tensors():
    g = np.random.default_rng(0)
    ts = [g.normal(size=(5, 7)) for _ in range(4)]
    ws = list(g.dirichlet(np.ones(4)))
    for density in (0.2, 0.5, 1.0):
        got = M.ties([torch.tensor(t, dtype=torch.float32) for t in ts], ws,
                     {**P, "ties_density": density, "lambda": 1.3}).numpy()
        np.testing.assert_allclose(got, peers_ties(ts, ws, density, 1.3), rtol=1e-5, atol=1e-6)


def test_dare_equals_drop_and_rescale_with_the_same_draws():
    """PEERS.md C.2: Bernoulli(1 - p) masks, kept entries x 1/(1 - p), then the weighted sum (dare_linear)
    or the sign election without the division (dare_ties); the masks are the generator's draws in order."""
    g = np.random.default_rng(1)
    ts = [torch.tensor(g.normal(size=(6, 4)), dtype=torch.float32) for _ in range(3)]
    ws, p = [0.5, 0.3, 0.2], 0.7
    params = {**P, "dare_drop": p, "lambda": 1.5}
    got = M.dare_linear(ts, ws, params, torch.Generator().manual_seed(5)).numpy()
    draws = torch.Generator().manual_seed(5)
    masks = [(torch.rand(t.shape, generator=draws) >= p).numpy() for t in ts]
    dropped = [np.where(m, t.numpy() / (1 - p), 0.0) for m, t in zip(masks, ts)]
    np.testing.assert_allclose(got, 1.5 * sum(w * d for w, d in zip(ws, dropped)), rtol=1e-5, atol=1e-6)
    got = M.dare_ties(ts, ws, params, torch.Generator().manual_seed(5)).numpy()
    weighted = np.stack([w * d for w, d in zip(ws, dropped)])
    sign = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
    np.testing.assert_allclose(got, 1.5 * (weighted * (np.sign(weighted) == sign)).sum(0), rtol=1e-5, atol=1e-6)


def test_dare_drops_the_share_p_and_is_unbiased():
    t = torch.ones(200, 200)
    out = M.random_drop(t, 0.8, torch.Generator().manual_seed(0))
    assert abs(float((out == 0).float().mean()) - 0.8) < 0.01
    assert set(torch.unique(out).tolist()) == {0.0, 5.0}
    assert abs(float(out.mean()) - 1.0) < 0.03  # E[mask / (1 - p)] = 1


# --------------------------------------------------------------------------- LoRA in deltaW space

LORA = DeltaConfig("lora", lora_r=2, lora_alpha=4)  # scale 2
KEYS = ("enc.q.lora", "dec.v.lora")


def lora_delta(seed, shared_a=None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, k in enumerate(KEYS):
        out[f"{k}.A"] = shared_a[i] if shared_a is not None else torch.randn(2, 5, generator=g)  # (r, in)
        out[f"{k}.B"] = torch.randn(6, 2, generator=g)  # (out, r)
    return out


def delta_w(d, k, scale=2.0):
    return scale * d[f"{k}.B"].double() @ d[f"{k}.A"].double()


def test_lora_exact_is_the_best_rank_r_approximation_of_the_exact_sum():
    deltas = [lora_delta(s) for s in range(3)]
    ws = [0.5, 0.3, 0.2]
    out = M.merge_deltas("lora_exact", deltas, ws, LORA)
    for k in KEYS:
        assert out[f"{k}.A"].shape == (2, 5) and out[f"{k}.B"].shape == (6, 2)
        exact = sum(w * delta_w(d, k) for w, d in zip(ws, deltas))
        u, s, vh = np.linalg.svd(exact.numpy())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        np.testing.assert_allclose(delta_w(out, k).numpy(), best, rtol=1e-4, atol=1e-5)
        gram_b = out[f"{k}.B"].T @ out[f"{k}.B"]
        gram_a = out[f"{k}.A"] @ out[f"{k}.A"].T
        np.testing.assert_allclose(gram_b.numpy(), gram_a.numpy(), atol=1e-4)  # balanced: the same singular values
    # with a shared A the exact sum has rank r: the SVD gives it back exactly
    shared = [torch.randn(2, 5, generator=torch.Generator().manual_seed(9)) for _ in KEYS]
    deltas = [lora_delta(s, shared) for s in range(3)]
    out = M.merge_deltas("lora_exact", deltas, ws, LORA)
    for k in KEYS:
        np.testing.assert_allclose(delta_w(out, k).numpy(), sum(w * delta_w(d, k) for w, d in zip(ws, deltas)).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_lora_merges_work_on_delta_w_then_svd():
    deltas = [lora_delta(s) for s in range(3)]
    ws = [0.2, 0.5, 0.3]
    out = M.merge_deltas("ties", deltas, ws, LORA, params={"ties_density": 0.3})
    for k in KEYS:
        merged = peers_ties([delta_w(d, k).numpy() for d in deltas], ws, 0.3, 1.0)
        u, s, vh = np.linalg.svd(merged)
        np.testing.assert_allclose(delta_w(out, k).numpy(), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)
    with pytest.raises(M.MergeError, match="LoRA deltas only"):
        M.merge_deltas("lora_exact", [{"x.up": torch.ones(2)}], [1.0], DeltaConfig("adapter"))


def test_adapter_merges_work_on_the_raw_parameters():
    g = torch.Generator().manual_seed(3)
    deltas = [{"l.adapter.down": torch.randn(4, 3, generator=g), "l.adapter.up": torch.randn(3, 4, generator=g)}
              for _ in range(3)]
    ws = [0.1, 0.6, 0.3]
    out = M.merge_deltas("ties", deltas, ws, DeltaConfig("adapter"))
    for k in deltas[0]:
        np.testing.assert_allclose(out[k].numpy(), peers_ties([d[k].numpy() for d in deltas], ws, 0.2, 1.0),
                                   rtol=1e-5, atol=1e-6)
    out = M.merge_deltas("task_arithmetic", deltas, ws, DeltaConfig("adapter"), params={"lambda": 0.5})
    for k in deltas[0]:
        np.testing.assert_allclose(out[k].numpy(), 0.5 * sum(w * d[k].numpy() for w, d in zip(ws, deltas)), rtol=1e-5)


def test_lora_product_error_by_hand():
    """r = 1, scale 1, B1 A1 = e1 e1^T, B2 A2 = e2 e2^T, w = (1/2, 1/2): exact I/2, the paper's rule
    (B1 + B2)(A1 + A2)/4 = ones/4; the difference has norm 1/2, the exact sum 1/sqrt 2: error 1/sqrt 2."""
    cfg = DeltaConfig("lora", lora_r=1, lora_alpha=1)
    d1 = {"m.lora.A": torch.tensor([[1.0, 0.0]]), "m.lora.B": torch.tensor([[1.0], [0.0]])}
    d2 = {"m.lora.A": torch.tensor([[0.0, 1.0]]), "m.lora.B": torch.tensor([[0.0], [1.0]])}
    assert M.lora_product_error([d1, d2], [0.5, 0.5], cfg) == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert M.lora_product_error([d1], [1.0], cfg) == 0.0
    # several modules: one norm over all of them, not a mean of ratios
    deltas = [lora_delta(s) for s in range(2)]
    ws = [0.7, 0.3]
    num = den = 0.0
    for k in KEYS:
        b = sum(w * d[f"{k}.B"].double() for w, d in zip(ws, deltas))
        a = sum(w * d[f"{k}.A"].double() for w, d in zip(ws, deltas))
        exact = sum(w * delta_w(d, k) for w, d in zip(ws, deltas))
        num += float(((2 * b @ a - exact) ** 2).sum())
        den += float((exact ** 2).sum())
    assert M.lora_product_error(deltas, ws, LORA) == pytest.approx(math.sqrt(num / den), rel=1e-9)


# --------------------------------------------------------------------------- initialisations: names and weights

def test_names_weights_and_defaults():
    scores = {"b": 0.1, "c": 2.0, "d": 0.5}  # Loss: lower is more similar
    assert parse_init_name("ties=Loss") == ("ties", "Loss") and parse_init_name("lorahub") == ("lorahub", None)
    for bad, msg in [("topk", "needs a score"), ("lorahub=Loss", "reads no score"), ("nope", "unknown initialisation"),
                     ("ties=Nope", "unknown metric")]:
        with pytest.raises(ScoreError, match=msg):
            parse_init_name(bad)
    w, meta = init_spec("ties").weights(inputs())
    assert w == {"b": 1 / 3, "c": 1 / 3, "d": 1 / 3} and meta["weights_from"] == "uniform"
    assert meta["merge"] == {"lambda": 1.0, "ties_density": 0.2}
    w, meta = init_spec("dare_ties=Loss").weights(inputs(scores=scores))
    e = np.exp(-np.array([0.1, 2.0, 0.5]) / 0.1)
    np.testing.assert_allclose([w[s] for s in "bcd"], e / e.sum(), rtol=1e-12)
    assert meta["merge"] == {"lambda": 1.0, "dare_drop": 0.8}
    w, meta = init_spec("topk=Loss", parse_merge_options(["topk_k=2"])).weights(inputs(scores=scores))
    assert w == {"b": 0.5, "d": 0.5} and meta["merge"] == {"topk_k": 2}  # the two lowest losses
    assert init_spec("topk=Loss").combine is None and init_spec("ties=Loss").combine is not None
    with pytest.raises(ScoreError, match="ties_density must be in"):
        parse_merge_options(["ties_density=0"])


# --------------------------------------------------------------------------- LoraHub

def test_lorahub_recovers_the_source_the_target_copies_and_is_deterministic():
    """Toy: the target's best delta is a copy of source 2's, so the loss of sum_i w_i delta_i is the
    relative squared distance to delta_2: the answer is w = e_2 (the L1 term pulls it slightly to 0)."""
    g = np.random.default_rng(0)
    deltas = g.normal(size=(4, 50))

    def loss_of(w):
        return float(((np.asarray(w) @ deltas - deltas[2]) ** 2).sum() / (deltas[2] ** 2).sum())

    found = H.search(loss_of, 4, seed=42)
    assert found.evaluations == 40 and int(np.argmax(found.weights)) == 2
    assert found.weights[2] > 0.8 and max(abs(x) for i, x in enumerate(found.weights) if i != 2) < 0.2
    assert loss_of(found.weights) < 0.1 * loss_of([0.0] * 4)
    np.random.seed(123)  # the global generator is not what the search draws from
    again = H.search(loss_of, 4, seed=42)
    assert again.weights == found.weights
    from_start = H.search(loss_of, 4, start=[0.0, 0.0, 1.0, 0.0], seed=42, budget=10)
    assert from_start.evaluations == 10 and from_start.best_objective <= 0.05 * 0.25 + 1e-12  # the start is the answer


def tiny_model(method):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2,
                   feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return attach_delta(T5ForConditionalGeneration(cfg), DeltaConfig(method, lora_r=2, adapter_size=3, prefix_num=2,
                                                                     prefix_r=4))


class _Tok:
    pad_token_id = 0


@pytest.mark.parametrize("method", ["adapter", "lora", "prefix"])
def test_train_split_loss_is_the_loss_of_the_weighted_sum_for_every_method(method):
    from pewe.data import Rows

    model = tiny_model(method)
    own = {k: v.clone() for k, v in delta_state_dict(model).items()}
    g = torch.Generator().manual_seed(1)
    deltas = {s: {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in own.items()} for s in ("b", "c")}
    rows = Rows([[5, 6, 7, 1], [8, 9, 1]], [[3, 4, 1], [11, 1]], [0, 1], [None, None])
    loss = H.TrainSplitLoss(model, _Tok(), rows, deltas, "cpu", batch_size=1)
    with loss:
        got = loss({"b": 0.7, "c": -0.4})
    assert all(torch.equal(v, own[k]) for k, v in delta_state_dict(model).items())  # the model's own delta is back
    # the same by hand: load 0.7 b - 0.4 c, one batch of both rows, the model's token-mean cross-entropy
    from delta_modules import load_delta_state
    from pewe.data import collate
    load_delta_state(model, {k: 0.7 * deltas["b"][k] - 0.4 * deltas["c"][k] for k in own})
    batch = collate(rows, [0, 1], 0)
    model.eval()
    with torch.no_grad():
        want = float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss)
    assert got == pytest.approx(want, rel=1e-5)
    found = H.search(loss, 2, budget=6, seed=0)
    assert found.evaluations == 6 and loss.calls == 1 + 6


# --------------------------------------------------------------------------- the study: rows, sidecars, reruns

PEER_INITS = ["ties=Loss", "dare_ties", "lora_exact=Loss", "topk=Loss", "lorahub", "lorahub_from=Loss",
              "task_arithmetic", "dare_linear=Loss"]


def study_args(backbone, tasks, out, *extra):
    return ["--model", backbone, "--tokenizer_path", backbone, "--tasks", *TINY_TASKS, "--source_task_dir", tasks,
            "--target_task_dir", tasks, "--output_dir", out, "--methods", "lora", "--lora_r", "2", "--seeds", "42",
            "--scores", "Loss", "--inits", "average", *PEER_INITS, "--merge_options", "lorahub_budget=8", "topk_k=1",
            "--step_budgets", "0", "--source_train_iters", "10", "--target_train_iters", "10", "--valid_interval", "5",
            "--log_interval", "5", "--learning_rate", "0.03", "--predict_batch_size", "16", "--max_output_length", "8",
            "--sim_batch_size", "8", "--device", "cpu", "--precision", "fp32", "--quiet", "--progress=false", *extra]


def run(*argv):
    return run_study.main(list(map(str, argv)))


@pytest.fixture(scope="module")
def peer_study(tiny_backbone, tiny_tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    assert run(*study_args(tiny_backbone, tiny_tasks, out)) == 0
    return out


def lora_table(text, title):
    lines = text[text.index("## lora"):].splitlines()
    start = lines.index(f"### {title}")
    start = next(i for i in range(start, len(lines)) if lines[i].startswith("|")) + 1  # past the header
    rows = {}
    for line in lines[start + 1:]:  # past the |---| line
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_peers_inits_are_rows_of_the_report_with_their_runs_scores(peer_study):
    out = peer_study
    text = (out / "report.md").read_text()
    rows = lora_table(text, "Test score after early stopping")
    for init in ["average", *PEER_INITS, "Loss"]:
        scores = []
        for t in TINY_TASKS:
            res = next((out / "lora" / "targets" / init / "seed_42" / t / "runs").glob("*/result.json"))
            scores.append(json.loads(res.read_text())["test_score"])
        # one seed: each cell is the score x 100, the mean column the mean over targets
        assert rows[init] == [f"{100 * x:.2f}" for x in scores] + [f"{100 * sum(scores) / 3:.2f}"]
    assert f"Finished runs: {(2 + len(PEER_INITS) + 1) * 3} of {(2 + len(PEER_INITS) + 1) * 3}." in text
    answer = text[text.index("## The answer"):text.index("## Majority-answer baseline")]
    assert all(f"\n| {init} | " in answer for init in PEER_INITS)  # each is a row of the answer's gains
    params = lora_table(text, "Initialisation parameters and the LoRA product")
    assert params["ties=Loss"][0] == "lambda 1, ties_density 0.2" and params["lorahub"][1] == "8"
    assert params["topk=Loss"][0] == "topk_k 1" and params["average"][0] == "—"
    for init in ["average", "Loss", *PEER_INITS]:
        assert params[init][2].endswith(" %")
    with open(out / "init_compute.csv") as f:
        compute = list(csv.DictReader(f))
    assert len(compute) == 3 * (2 + len(PEER_INITS)) and all(float(r["compute_seconds"]) > 0 for r in compute)
    assert {r["loss_evaluations"] for r in compute if r["init"].startswith("lorahub")} == {"8"}


def sources_of(out):
    return {t: read_delta(out / "lora" / "sources" / t / "checkpoint-best.safetensors")[0] for t in TINY_TASKS}


def test_the_study_writes_what_the_rules_say(peer_study):
    out = peer_study
    src = sources_of(out)
    cfg = DeltaConfig("lora", lora_r=2, lora_alpha=16)
    scale = 16 / 2
    target = TINY_TASKS[0]
    side = lambda init: json.loads((out / "lora" / "init" / init / f"without_{target}_checkpoint.json").read_text())
    loss_w = side("Loss")["weights"]
    assert side("ties=Loss")["weights"] == loss_w and side("ties=Loss")["merge"] == {"lambda": 1.0, "ties_density": 0.2}
    got, _, _ = read_delta(out / "lora" / "init" / "ties=Loss" / f"without_{target}_checkpoint.safetensors")
    names = list(loss_w)
    for a_key in [k for k in got if k.endswith(".A")]:
        b_key = a_key[:-2] + ".B"
        products = [scale * src[s][b_key].double().numpy() @ src[s][a_key].double().numpy() for s in names]
        merged = peers_ties(products, [loss_w[s] for s in names], 0.2, 1.0)
        u, sv, vh = np.linalg.svd(merged)
        np.testing.assert_allclose(scale * got[b_key].double().numpy() @ got[a_key].double().numpy(),
                                   (u[:, :2] * sv[:2]) @ vh[:2], rtol=1e-3, atol=1e-5)
    # the paper's rule (the Loss init) against the exact product, at its weights
    error = M.lora_product_error([src[s] for s in names], [loss_w[s] for s in names], cfg)
    assert side("Loss")["lora_product_error"] == pytest.approx(error, rel=1e-9) and 0 < error < 10
    # topk_k=1: the single best source by Loss, weight 1
    best = max(loss_w, key=loss_w.get)
    assert side("topk=Loss")["weights"] == {best: 1.0}
    topk, _, _ = read_delta(out / "lora" / "init" / "topk=Loss" / f"without_{target}_checkpoint.safetensors")
    assert all(torch.equal(topk[k], src[best][k].float()) for k in topk)
    # LoraHub: weights within the bound, a search of the budget, and the initial delta is their sum
    hub = side("lorahub")
    assert hub["loss_evaluations"] == 8 and all(abs(w) <= 1.5 for w in hub["weights"].values())
    assert side("lorahub_from=Loss")["search"]["start_weights"] == [loss_w[s] for s in names]
    delta, _, _ = read_delta(out / "lora" / "init" / "lorahub" / f"without_{target}_checkpoint.safetensors")
    for k in delta:
        np.testing.assert_allclose(delta[k].numpy(), sum(w * src[s][k].double().numpy() for s, w in hub["weights"].items()),
                                   rtol=1e-5, atol=1e-6)
    # the heat maps and weight files of the summary are there
    for init in PEER_INITS:
        d = out / "lora" / "init" / init
        assert (d / "hot_pic_all.png").is_file() and (d / "final_weight.txt").is_file() and (d / "weights.csv").is_file()


def test_rerun_skips_without_searching_and_a_changed_option_is_refused(peer_study, tiny_backbone, tiny_tasks, capsys):
    out = peer_study
    log = out / "log.txt"
    before = len(log.read_text())
    stamps = {p: p.stat().st_mtime_ns for p in (out / "lora" / "init").rglob("*.safetensors")}
    assert run(*study_args(tiny_backbone, tiny_tasks, out, "--steps", "ensemble")) == 0
    new = log.read_text()[before:]
    assert new.count("already done, skipping") == 3 * (1 + len(PEER_INITS) + 1) and "loss evaluations" not in new
    assert {p: p.stat().st_mtime_ns for p in (out / "lora" / "init").rglob("*.safetensors")} == stamps
    capsys.readouterr()
    assert run(*study_args(tiny_backbone, tiny_tasks, out, "--steps", "ensemble", "--merge_options",
                           "lorahub_budget=8", "topk_k=1", "ties_density=0.5")) == 1
    assert "made with other merge parameters than now" in capsys.readouterr().err
    assert run(*study_args(tiny_backbone, tiny_tasks, out, "--steps", "ensemble", "--merge_options",
                           "lorahub_budget=9", "topk_k=1")) == 1
    assert "made with other search inputs" in capsys.readouterr().err


def test_every_peer_init_is_deterministic_for_a_seed(peer_study, tiny_backbone, tiny_tasks, tmp_path):
    """The same study options in a new folder (the same sources) give the same initial deltas, bit for bit."""
    reuse = ["--source_dir", peer_study / "{method}" / "sources"]
    again = tmp_path / "again"
    assert run(*study_args(tiny_backbone, tiny_tasks, again, *reuse, "--steps", "similarity", "ensemble")) == 0
    for init in PEER_INITS:
        for t in TINY_TASKS:
            name = f"without_{t}_checkpoint.safetensors"
            a = (peer_study / "lora" / "init" / init / name).read_bytes()
            assert a == (again / "lora" / "init" / init / name).read_bytes(), (init, t)
    other = tmp_path / "other_seed"
    assert run(*study_args(tiny_backbone, tiny_tasks, other, *reuse, "--steps", "similarity", "ensemble",
                           "--source_seed", "7")) == 0
    name = f"without_{TINY_TASKS[0]}_checkpoint.safetensors"
    assert (peer_study / "lora" / "init" / "dare_ties" / name).read_bytes() != \
        (other / "lora" / "init" / "dare_ties" / name).read_bytes()  # another seed, other drops


@pytest.mark.parametrize("extra,msg", [
    (["--inits", "lora_exact"], "--inits lora_exact: for LoRA deltas only, but --methods has adapter"),
    (["--inits", "ties=KL"], "--inits ties=KL: KL is not among --scores"),
    (["--inits", "topk"], "needs a score"),
    (["--inits", "Loss"], "--inits: Loss is a score"),
    (["--merge_options", "ties_density=1.5"], "ties_density must be in (0, 1]"),
    (["--merge_options", "density=0.5"], "merge option 'density=0.5'"),
])
def test_bad_peer_options_fail_cleanly(tiny_tasks, tmp_path, capsys, extra, msg):
    argv = ["--tasks", *TINY_TASKS, "--source_task_dir", str(tiny_tasks), "--target_task_dir", str(tiny_tasks),
            "--output_dir", str(tmp_path), "--steps", "report", "--scores", "Loss", "--quiet", *extra]
    assert run_study.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]


def test_merges_do_not_depend_on_the_key_order_of_a_loaded_file():
    deltas = [lora_delta(s) for s in range(3)]
    shuffled = [dict(reversed(list(d.items()))) for d in deltas]
    for merge in ("dare_ties", "dare_linear", "ties"):
        a = M.merge_deltas(merge, deltas, [0.2, 0.3, 0.5], LORA, M.merge_rng(1, "t"))
        b = M.merge_deltas(merge, shuffled, [0.2, 0.3, 0.5], LORA, M.merge_rng(1, "t"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    c = M.merge_deltas("dare_ties", deltas, [0.2, 0.3, 0.5], LORA, M.merge_rng(2, "t"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- unit_model/unit_model_merge.py

def load_script():
    spec = importlib.util.spec_from_file_location("unit_model_merge", REPO / "unit_model" / "unit_model_merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script_pool(tiny_backbone, tiny_tasks, tmp_path_factory):
    """Random LoRA (r 2) source deltas of the tiny backbone for the three tiny tasks, and a Loss result.tsv."""
    from pewe.model import load_backbone

    root = tmp_path_factory.mktemp("merge_script")
    model, _ = load_backbone(tiny_backbone, tiny_backbone)
    cfg = DeltaConfig("lora", lora_r=2)
    shapes = {k: v.shape for k, v in delta_state_dict(attach_delta(model, cfg)).items()}
    deltas = {}
    for i, t in enumerate(TINY_TASKS):
        g = torch.Generator().manual_seed(10 + i)
        deltas[t] = {k: 0.3 * torch.randn(s, generator=g) for k, s in shapes.items()}
        save_delta(root / "sources" / t / "checkpoint-best.safetensors", deltas[t], cfg, task=t)
    scores = {t: {s: 0.5 + 0.25 * ((i + j) % 3) for j, s in enumerate(TINY_TASKS)} for i, t in enumerate(TINY_TASKS)}
    lines = []
    for t in TINY_TASKS:
        lines += [t] + [f"{s},{scores[t][s]}" for s in TINY_TASKS]
    (root / "result.tsv").write_text("\n".join(lines) + "\n")
    return root, deltas, scores, cfg


def script_args(root, tasks, out, *extra):
    return [f"--origin_data_path={tasks}", f"--source_ckpt_path={root / 'sources'}", f"--sim_path={root / 'result.tsv'}",
            f"--save_ckpt_path={out}", "--delta=lora", "--progress=false", *extra]


def test_unit_model_merge_writes_the_others_files_with_the_merged_deltas(script_pool, tiny_tasks, tmp_path):
    root, deltas, scores, cfg = script_pool
    out = tmp_path / "ties"
    assert load_script().main(script_args(root, tiny_tasks, out, "--method=ties", "--metric=Loss", "--tem=0.5",
                                          "--ties_density=0.3")) == 0
    lines = (out / "final_weight.txt").read_text().splitlines()
    assert lines[0] == TINY_TASKS[0] and len(lines) == 6
    with open(out / "weights.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (out / "hot_pic_all.png").stat().st_size > 0
    for t in TINY_TASKS:
        others = [s for s in TINY_TASKS if s != t]
        e = np.exp(-np.array([scores[t][s] for s in others]) / 0.5)
        w = list(e / e.sum())
        got, _, meta = read_delta(out / f"without_{t}_checkpoint.safetensors")
        np.testing.assert_allclose([meta["weights"][s] for s in others], w, rtol=1e-12)
        assert meta["merge"] == {"lambda": 1.0, "ties_density": 0.3} and meta["compute_seconds"] > 0
        assert meta["lora_product_error"] == pytest.approx(M.lora_product_error([deltas[s] for s in others], w, cfg))
        want = M.merge_deltas("ties", [deltas[s] for s in others], w, cfg, params={"ties_density": 0.3})
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_unit_model_merge_dare_is_seeded(script_pool, tiny_tasks, tmp_path):
    root = script_pool[0]
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        assert load_script().main(script_args(root, tiny_tasks, out, "--method=dare_linear", f"--seed={seed}")) == 0
        runs[name] = (out / f"without_{TINY_TASKS[0]}_checkpoint.safetensors").read_bytes()
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


def test_unit_model_merge_lorahub_searches_on_the_train_split(script_pool, tiny_backbone, tiny_tasks, tmp_path):
    root, deltas, _, _ = script_pool
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        r = subprocess.run([sys.executable, str(REPO / "unit_model" / "unit_model_merge.py"),
                            *script_args(root, tiny_tasks, out, "--method=lorahub", f"--model={tiny_backbone}",
                                         f"--tokenizer_path={tiny_backbone}", "--device=cpu", "--precision=fp32",
                                         "--lorahub_budget=6", "--max_output_length=8")],
                           capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                              "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        outs.append(out)
    for t in TINY_TASKS:
        got, _, meta = read_delta(outs[0] / f"without_{t}_checkpoint.safetensors")
        assert meta["method"] == "lorahub" and meta["loss_evaluations"] == 6 and meta["start"] == "zeros"
        assert all(abs(w) <= 1.5 for w in meta["weights"].values()) and meta["compute_seconds"] > 0
        for k in got:
            want = sum(w * deltas[s][k].double() for s, w in meta["weights"].items())
            np.testing.assert_allclose(got[k].numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
        again = json.loads((outs[1] / f"without_{t}_checkpoint.json").read_text())
        assert again["weights"] == meta["weights"]  # the same search in another process
    assert (outs[0] / "hot_pic_all.png").is_file() and (outs[0] / "final_weight.txt").is_file()


@pytest.mark.parametrize("extra,msg", [
    (["--method=lora_exact", "--delta=adapter"], "a lora delta, but delta = adapter"),
    (["--method=topk"], "needs a score: topk=SCORE"),
    (["--method=ties", "--ties_density=0"], "ties_density must be in (0, 1]"),
    (["--method=bogus"], "unknown initialisation 'bogus'"),
])
def test_unit_model_merge_bad_options_are_one_line(script_pool, tiny_tasks, tmp_path, capsys, extra, msg):
    root = script_pool[0]
    out = tmp_path / "never"
    assert load_script().main(script_args(root, tiny_tasks, out, *extra)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and (msg is None or msg in err[0]), err
    assert not out.exists()


def test_lorahub_and_ties_for_adapters_and_prefix_in_the_study(tiny_backbone, tiny_tasks, tmp_path):
    from delta_modules import load_delta
    from pewe.model import load_backbone

    out = tmp_path / "ap"
    argv = study_args(tiny_backbone, tiny_tasks, out, "--steps", "sources", "similarity", "ensemble")
    argv[argv.index("--inits") + 1:argv.index("--merge_options")] = ["lorahub", "ties", "dare_ties=Loss"]
    argv[argv.index("--methods") + 1:argv.index("--methods") + 2] = ["adapter", "prefix"]
    assert run(*argv, "--adapter_size", "4", "--prefix_num", "4", "--prefix_r", "8") == 0
    for method, cfg in (("adapter", DeltaConfig("adapter", adapter_size=4)), ("prefix", DeltaConfig("prefix", prefix_num=4, prefix_r=8))):
        model = attach_delta(load_backbone(tiny_backbone, tiny_backbone)[0], cfg)
        for init in ("lorahub", "ties", "dare_ties=Loss"):
            for t in TINY_TASKS:
                meta = load_delta(model, out / method / "init" / init / f"without_{t}_checkpoint.safetensors")
                assert meta["compute_seconds"] > 0 and "lora_product_error" not in meta
                if init == "lorahub":
                    assert meta["loss_evaluations"] == 8

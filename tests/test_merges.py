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

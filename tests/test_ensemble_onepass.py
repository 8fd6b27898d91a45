"""pewe.ensemble.weighted_averages: every target's average from one read of each source."""
import weakref

import pytest
import torch

from pewe import averaging as A
from pewe import layout as L
from pewe import weights as W
from test_ensemble import make_sources

TASKS = ["a", "b", "c", "d", "e"]


def loo(tasks=TASKS):
    scores = {t: {s: float(i + 2 * j) / 10 for j, s in enumerate(tasks)} for i, t in enumerate(tasks)}
    return W.loo_weights(scores, tasks, -1, 0.5)


def counting_reads(monkeypatch):
    """Record each read_delta call and how many earlier sources are still in memory at that moment."""
    reads, live_at_read, alive, read = [], [], [], A.read_delta

    def tracking_read(path):
        live_at_read.append(sum(r() is not None for r in alive))
        tensors, cfg, meta = read(path)
        reads.append(path)
        alive.append(weakref.ref(next(iter(tensors.values()))))
        return tensors, cfg, meta

    monkeypatch.setattr(A, "read_delta", tracking_read)
    return reads, live_at_read


def test_equals_per_target_average_bit_for_bit(tmp_path):
    make_sources(tmp_path, TASKS)
    ckpts = L.source_checkpoints(tmp_path, TASKS)
    weights = loo()
    got = {t: (tensors, cfg) for t, tensors, cfg in A.weighted_averages(weights, ckpts)}
    assert list(got) == TASKS
    for t, w in weights.items():
        expect, cfg = A.weighted_average([(ckpts[s], x) for s, x in w.items()])
        assert got[t][1] == cfg
        for k, v in expect.items():  # the same sums in the same order: equal bits
            assert torch.equal(got[t][0][k].view(torch.int32), v.view(torch.int32)), (t, k)


def test_reads_each_source_once_holding_one_at_a_time(tmp_path, monkeypatch):
    make_sources(tmp_path, TASKS)
    ckpts = L.source_checkpoints(tmp_path, TASKS)
    reads, live_at_read = counting_reads(monkeypatch)
    out = list(A.weighted_averages(loo(), ckpts))
    assert len(out) == 5 and reads == list(ckpts.values())
    assert max(live_at_read) == 0  # the previous source is gone before the next is read


def test_a_small_budget_makes_groups_of_targets_with_the_same_result(tmp_path, monkeypatch):
    make_sources(tmp_path, TASKS)
    ckpts = L.source_checkpoints(tmp_path, TASKS)
    weights = loo()
    full = {t: x for t, x, _ in A.weighted_averages(weights, ckpts)}
    size = 4 * sum(v.numel() for v in full["a"].values())
    reads, _ = counting_reads(monkeypatch)
    grouped = {t: x for t, x, _ in A.weighted_averages(weights, ckpts, max_bytes=2 * size)}  # 2 targets a pass
    # passes for (a, b), (c, d), (e): the first reads all 5, the second all 5, the last the 4 others than e
    assert len(reads) == 5 + 5 + 4
    assert all(torch.equal(full[t][k], grouped[t][k]) for t in TASKS for k in full[t])


def test_a_bad_source_fails_before_any_target_is_yielded(tmp_path):
    from delta_modules import DeltaConfig, DeltaError, save_delta
    from test_ensemble import hand_delta

    make_sources(tmp_path, TASKS[:-1])
    save_delta(tmp_path / "e" / "checkpoint-best.safetensors", hand_delta(9), DeltaConfig("lora", lora_r=2, lora_alpha=4))
    ckpts = L.source_checkpoints(tmp_path, TASKS)
    gen = A.weighted_averages(loo(), ckpts, max_bytes=1)  # one target per pass: still all checked first
    with pytest.raises(DeltaError, match="e/checkpoint-best.safetensors"):
        next(gen)
    with pytest.raises(W.EnsembleError, match="not finite"):
        next(A.weighted_averages({"a": {"b": float("inf")}}, ckpts))
    with pytest.raises(W.EnsembleError, match="no checkpoint for source"):
        next(A.weighted_averages({"a": {"zz": 1.0}}, ckpts))

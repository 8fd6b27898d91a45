"""The embedded backbone's pretraining: word-order sensitivity and the position-bias learning rate."""

import pytest
import torch

from conftest import REPO
from pewe.data import read_tsv
from pewe.pretrain import (Mixture, order_sensitivity, position_bias_groups, pretrain, row_losses,
                           shuffled_inputs, supervised_batches)

NULL = torch.autocast("cpu", enabled=False)


def _batches(tokenizer, task="babi-qa1", rows=16, seed=0):
    examples = read_tsv(REPO / "data" / "fewshot" / task / f"{task}_64_42_dev.tsv")[:rows]
    return supervised_batches(tokenizer, [(task, e.input, e.answers) for e in examples], 2, 8, 128, 16, seed)


def _model(path):
    from pewe.model import load_backbone

    model, tok = load_backbone(path, path, "cpu")
    return model.eval(), tok


def test_shuffled_inputs_keep_each_row_tokens_mask_and_labels(tiny_backbone):
    _, tok = _model(tiny_backbone)
    batches = _batches(tok)
    shuffled = shuffled_inputs(batches, seed=1)
    moved = 0
    for b, s in zip(batches, shuffled):
        assert torch.equal(b["attention_mask"], s["attention_mask"]) and torch.equal(b["labels"], s["labels"])
        for i, n in enumerate(b["attention_mask"].sum(1).tolist()):
            assert sorted(b["input_ids"][i, :n].tolist()) == sorted(s["input_ids"][i, :n].tolist())
            assert torch.equal(b["input_ids"][i, n:], s["input_ids"][i, n:])  # padding untouched
            moved += int(not torch.equal(b["input_ids"][i, :n], s["input_ids"][i, :n]))
    assert moved >= 12


def test_position_bias_group_gets_the_scaled_rate_and_no_decay(tiny_backbone):
    model, _ = _model(tiny_backbone)
    groups = position_bias_groups(model, 0.01, 50.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in groups[1]["params"]] == [
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    assert groups[1]["weight_decay"] == 0 and groups[1]["lr_scale"] == 50.0
    assert len(groups[0]["params"]) + 2 == len(list(model.parameters()))


@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_first_update_moves_the_bias_by_lr_times_scale(tiny_backbone, scale):
    """Adam's first step moves every parameter with a gradient by the learning rate (m/sqrt(v) = sign
    of the gradient after bias correction): the bias tables must move scale x lr, the rest lr."""
    model, tok = _model(tiny_backbone)
    model.train()
    bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    q = model.encoder.block[0].layer[0].SelfAttention.q.weight
    before_bias, before_q = bias.detach().clone(), q.detach().clone()
    examples = read_tsv(REPO / "data" / "fewshot" / "babi-qa1" / "babi-qa1_64_42_train.tsv")[:16]
    mix = Mixture(tok, [], [("babi-qa1", e.input, e.answers) for e in examples], 128, 16, 0)
    lr = 1e-4
    pretrain(model, mix, [mix.batch(8, 1.0)], 1, 8, lr, warmup=1, supervised_fraction=1.0, device="cpu", autocast=NULL,
             log_every=10, progress=False, position_lr_scale=scale)
    step_bias = (bias.detach() - before_bias).abs()
    step_q = (q.detach() - before_q - (-lr * 0.01 * before_q)).abs()  # q also decays (AdamW, 0.01)
    assert step_bias.max().item() == pytest.approx(lr * scale, rel=1e-3)
    assert step_q.max().item() == pytest.approx(lr, rel=1e-3)


@pytest.mark.parametrize("keep_best", [False, True])
def test_probe_rows_and_the_kept_weights(tiny_backbone, keep_best):
    """The probe runs every probe_every updates and at the end; with keep_best_probe the model ends
    with the weights it had at the probe with the best mean score (here the second of four)."""
    model, tok = _model(tiny_backbone)
    examples = read_tsv(REPO / "data" / "fewshot" / "babi-qa1" / "babi-qa1_64_42_train.tsv")[:16]
    mix = Mixture(tok, [], [("babi-qa1", e.input, e.answers) for e in examples], 128, 16, 0)
    scores, seen = iter([{"a": 0.1, "b": 0.3}, {"a": 0.9, "b": 0.5}, {"a": 0.2, "b": 0.2}, {"a": 0.6, "b": 0.6}]), []

    def probe(m):
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(scores)

    history = pretrain(model, mix, [mix.batch(4, 1.0)], 7, 4, 1e-3, warmup=1, supervised_fraction=1.0,
                       device="cpu", autocast=NULL, log_every=100, progress=False, probe=probe, probe_every=2,
                       keep_best_probe=keep_best)
    assert [r["step"] for r in history] == [2, 4, 6, 7]  # every 2 updates, and the last
    assert [r["probe_mean"] for r in history] == pytest.approx([0.2, 0.7, 0.2, 0.6])
    assert [r.get("kept", False) for r in history] == [False, keep_best, False, False]
    assert all(not torch.equal(seen[i]["shared.weight"], seen[i + 1]["shared.weight"]) for i in range(3))
    kept = seen[1] if keep_best else seen[3]
    for k, v in model.state_dict().items():
        assert torch.equal(v, kept[k]), k


def test_row_losses_average_to_the_model_loss(tiny_backbone):
    model, tok = _model(tiny_backbone)
    b = _batches(tok)[0]
    rows = row_losses(model, b, "cpu", NULL)
    n = (b["labels"] != -100).sum(1).float()
    with torch.no_grad():
        whole = model(**b).loss.item()
    assert ((rows * n).sum() / n.sum()).item() == pytest.approx(whole, rel=1e-5)


def test_order_sensitivity_is_zero_exactly_for_an_order_blind_model(tiny_backbone):
    model, tok = _model(tiny_backbone)
    batches = _batches(tok)
    with torch.no_grad():
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 2.0)
    assert order_sensitivity(model, batches, "cpu", NULL) > 1e-3
    with torch.no_grad():
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
    assert order_sensitivity(model, batches, "cpu", NULL) < 1e-5


def test_shipped_backbone_uses_word_order():
    """data/t5-mini must not be a bag of words: shuffling each input's words changes its loss on the
    dev rows of upstream tasks. (The backbone pretrained without the position-bias rate moved each
    row's loss by about 0.002 here: it was blind to word order; docs/BACKBONE.md.)"""
    model, tok = _model(REPO / "data" / "t5-mini")
    for task in ("babi-qa11", "babi-qa13"):
        assert order_sensitivity(model, _batches(tok, task=task, rows=32), "cpu", NULL) > 0.05, task


def test_recency_init_is_alibi_on_t5_buckets(tiny_backbone):
    """Within T5's exact buckets (distance < num_buckets / 4 both ways in the encoder, / 2 in the
    decoder) the bias is -slope_h x distance with ALiBi's slopes 2^(-8h/H); beyond, it keeps falling."""
    from pewe.backbone import recency_bias_init

    model, _ = _model(tiny_backbone)
    recency_bias_init(model)
    for stack, exact in ((model.encoder, 4), (model.decoder, 2)):
        att = stack.block[0].layer[0].SelfAttention
        n, heads = att.relative_attention_num_buckets, att.n_heads
        slopes = torch.tensor([2.0 ** (-8.0 * h / heads) for h in range(1, heads + 1)])
        w = att.relative_attention_bias.weight.detach()  # (buckets, heads)
        d = torch.arange(n // exact).float()
        torch.testing.assert_close(w[: n // exact], -d[:, None] * slopes[None, :])
        # one row of the bias the model adds, (heads, query, key): the last query prefers nearer keys
        bias = att.compute_bias(64, 64)[0, :, -1, :]  # keys 0..63, query 63
        assert (bias[:, 1:] >= bias[:, :-1]).all() and (bias[:, -1] > bias[:, 0]).all()


def _pretrain_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_backbone", REPO / "scripts" / "pretrain_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_script_recency_run_and_its_report(tiny_backbone, tmp_path):
    """Two updates from the recency start: the saved bias is still within the updates' reach of the
    ALiBi values, and the report measures order on upstream dev rows (absent without upstream tasks)."""
    import json
    import shutil

    from pewe.backbone import build_model, recency_bias_init, small_config
    from pewe.model import load_backbone

    texts = tmp_path / "tasks"
    for task in ("babi-qa1", "babi-qa6"):
        shutil.copytree(REPO / "data" / "fewshot" / task, texts / task)
    small = ["--tokenizer_path", str(tiny_backbone), "--text_dirs", str(texts), "--d_model", "32", "--d_ff", "64",
             "--num_layers", "2", "--num_heads", "4", "--d_kv", "8", "--steps", "2", "--batch_size", "4",
             "--heldout_batches", "1", "--log_every", "1", "--learning_rate", "1e-3", "--position_lr_scale", "2",
             "--device", "cpu", "--precision", "fp32", "--progress", "false"]
    script = _pretrain_script()
    out = tmp_path / "rec"
    assert script.main(small + ["--output_dir", str(out), "--position_bias_init", "recency",
                                "--upstream_tasks", "babi-qa6"]) == 0
    report = json.loads((out / "pretrain_report.json").read_text())
    assert report["updates"] == 2 and report["upstream_order_sensitivity"] > 0
    # the upstream dev score is followed (at the end here: probe_every 500 > 2 updates)
    assert [sorted(r.get("probe", {})) for r in report["history"]] == [[], ["babi-qa6"]]
    assert report["kept_update"] == 2 and 0 <= report["upstream_dev_scores"]["babi-qa6"] <= 1
    # tokenising with max_length left truncation on the backend; the saved tokenizer must not keep it
    assert json.loads((out / "tokenizer.json").read_text())["truncation"] is None
    model, tok = load_backbone(out, out, "cpu")
    start = recency_bias_init(build_model(small_config(tok, 32, 64, 2, 4, 8), seed=0))
    for name in ("encoder", "decoder"):
        key = f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        moved = (model.state_dict()[key] - start.state_dict()[key]).abs()
        # AdamW moves each entry by at most ~lr x scale per update; bf16 storage rounds the rest
        assert moved.max() < 2 * 1e-3 * 2 + 0.01 * start.state_dict()[key].abs().max(), name

    none = tmp_path / "plain"
    assert script.main(small + ["--output_dir", str(none), "--upstream_tasks"]) == 0
    assert json.loads((none / "pretrain_report.json").read_text())["upstream_order_sensitivity"] is None

    bad = tmp_path / "bad"
    assert script.main(small + ["--output_dir", str(bad), "--position_bias_init", "alibi"]) == 1
    assert not bad.exists() and not bad.with_name("bad.partial").exists()

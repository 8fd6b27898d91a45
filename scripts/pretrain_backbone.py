"""Build the embedded default backbone (data/t5-mini): a unigram tokenizer trained on the bundled
train splits and a small T5 v1.1-style model pretrained with span corruption mixed with supervised
upstream tasks. ``--steps 0`` gives the same architecture at random initialisation.

    python scripts/pretrain_backbone.py                          # -> data/t5-mini
    python scripts/pretrain_backbone.py --steps 0 --output_dir /tmp/t5-random
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pewe.model import REPO  # noqa: E402
from task_list import UPSTREAM_TASKS  # noqa: E402

output_dir = str(REPO / "data" / "t5-mini")  # the model + tokenizer folder written (replaced atomically)
text_dirs = [str(REPO / "data" / "full")]  # task folders whose *_train.tsv files are the training text
upstream_tasks = list(UPSTREAM_TASKS)  # tasks trained supervised here, kept out of transfer studies
tokenizer_path = ""  # reuse this tokenizer folder instead of training one (e.g. data/t5-mini)
vocab_size = 4000  # unigram pieces (plus 100 <extra_id_N> sentinels)
d_model = 256  # hidden size
d_ff = 640  # feed-forward width (gated-gelu, as T5 v1.1)
num_layers = 3  # encoder layers (and as many decoder layers)
num_heads = 4  # attention heads
d_kv = 64  # size of each head
dropout = 0.1  # dropout of the saved model (used when deltas are tuned on it)
pretrain_dropout = 0.0  # dropout while pretraining (0, as T5 v1.1 was pretrained)
steps = 2000  # pretraining updates (0: random initialisation only)
batch_size = 16  # sequences per update
learning_rate = 6e-4  # peak AdamW learning rate (2e-3 diverged in calibration)
position_bias_init = "normal"  # normal (T5's random init) or recency (ALiBi's distance penalty per head)
position_lr_scale = 50.0  # relative position bias tables learn at this multiple of the rate (1: blind to word order)
warmup = 200  # linear warm-up updates, then cosine decay to 10 %
supervised_fraction = 0.6  # share of each batch drawn from the upstream tasks' supervised rows
max_input_length = 128  # input tokens kept in pretraining (bAbI truncated from the left)
max_target_length = 64  # target tokens kept
heldout_batches = 4  # fixed batches of span-corrupted dev inputs for the held-out loss
log_every = 100  # updates between held-out evaluations
probe_every = 500  # updates between greedy scores on upstream dev rows, inputs cut as here (0: at the end only)
probe_rows = 100  # dev rows per upstream task in that score
keep_best_probe = False  # save the weights with the best mean upstream dev score instead of the last
max_seconds = 0  # stop pretraining after this many seconds (0: no limit), e.g. inside a time-limited job
seed = 0  # seed of the initialisation and the data order
device = "auto"  # auto (cuda if available), cpu or cuda
precision = "auto"  # auto (bf16 autocast where the hardware has it), fp32 or bf16
progress = True  # progress bar


def main(argv=None):
    import torch

    from pewe.backbone import build_model, recency_bias_init, save_backbone, small_config, train_tokenizer
    from pewe.cli import setup_logging
    from pewe.configurator import configure
    from pewe.data import read_tsv, source_text
    from pewe.model import autocast, pick_device, resolve_precision
    from pewe.pretrain import (Mixture, heldout_loss, load_texts, order_sensitivity, pretrain, supervised_batches,
                               task_scores)

    a = configure(globals(), __file__, argv)
    if a.position_bias_init not in ("normal", "recency"):
        print(f"error: --position_bias_init must be normal or recency, not {a.position_bias_init!r}", file=sys.stderr)
        return 1
    out = Path(a.output_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    logger = setup_logging(tmp, "pretrain_log.txt", quiet=a.progress)
    corpus = load_texts(a.text_dirs, "train")  # train splits only: dev and test never train the backbone
    if not corpus:
        print(f"error: no *_train.tsv under {a.text_dirs}", file=sys.stderr)
        return 1
    tok_texts = [source_text(t, x) for t, x, _ in corpus] + [ans for _, _, ans_ in corpus for ans in ans_]
    if a.tokenizer_path:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(a.tokenizer_path)
    else:
        tok = train_tokenizer(tok_texts, a.vocab_size)
    model = build_model(small_config(tok, a.d_model, a.d_ff, a.num_layers, a.num_heads, a.d_kv,
                                     dropout=a.pretrain_dropout), a.seed)
    if a.position_bias_init == "recency":
        recency_bias_init(model)
    device = pick_device(a.device)
    precision = resolve_precision(a.precision, device)
    model.to(device)
    upstream_tasks = set(a.upstream_tasks)
    upstream = [row for row in corpus if row[0] in upstream_tasks]
    missing = sorted(upstream_tasks - {row[0] for row in corpus})
    if missing:
        print(f"error: upstream task(s) without a train split under {a.text_dirs}: {missing}", file=sys.stderr)
        return 1
    torch.manual_seed(a.seed)
    mix = Mixture(tok, corpus, upstream, a.max_input_length, a.max_target_length, a.seed)
    dev = load_texts(a.text_dirs, "dev")  # only measures the model, never trains it
    held_mix = Mixture(tok, dev, [], a.max_input_length, a.max_target_length, a.seed + 1)
    heldout = [held_mix.batch(a.batch_size, 0.0) for _ in range(a.heldout_batches)]
    ctx = autocast(device, precision)
    report = {"config": vars(a), "parameters": model.num_parameters(), "device": str(device),
              "precision": precision, "heldout_loss_random_init": heldout_loss(model, heldout, device, ctx)}
    # the skill the upstream tasks teach comes and goes while the held-out loss keeps falling
    # (docs/BACKBONE.md section 5), so their dev score is followed as well
    probe_sets = {t: [e for d in a.text_dirs for f in sorted(Path(d).glob(f"{t}/*_dev.tsv")) for e in read_tsv(f)]
                  [:a.probe_rows] for t in a.upstream_tasks}
    probe_sets = {t: rows for t, rows in probe_sets.items() if rows}

    def probe(m):
        scores = task_scores(m, tok, probe_sets, device, precision, a.max_input_length, a.max_target_length)
        return {t: score for t, (_, score) in scores.items()}

    t0 = time.time()
    report["history"] = pretrain(model, mix, heldout, a.steps, a.batch_size, a.learning_rate, a.warmup,
                                 a.supervised_fraction, device, ctx, a.log_every, a.progress,
                                 max_seconds=a.max_seconds, position_lr_scale=a.position_lr_scale,
                                 probe=probe if probe_sets else None, probe_every=a.probe_every,
                                 keep_best_probe=a.keep_best_probe) if a.steps else []
    probed = [row for row in report["history"] if "probe" in row]  # the last row is always probed
    kept = next((row for row in probed if row.get("kept")), probed[-1] if probed else None)  # the saved weights
    report["kept_update"] = kept["step"] if kept else (report["history"][-1]["step"] if report["history"] else 0)
    report["heldout_loss"] = heldout_loss(model, heldout, device, ctx)
    # mean |change of a row's loss| when its input words are shuffled, on upstream dev rows: 0 for a
    # model blind to word order (on span-corruption batches it barely moves either way)
    up_dev = [row for row in dev if row[0] in upstream_tasks]  # none without upstream tasks
    report["upstream_order_sensitivity"] = order_sensitivity(
        model, supervised_batches(tok, up_dev, a.heldout_batches, a.batch_size, a.max_input_length,
                                  a.max_target_length, a.seed + 2), device, ctx) if up_dev else None
    report["updates"] = report["history"][-1]["step"] if report["history"] else 0
    report["upstream_dev_scores"] = kept["probe"] if kept else (probe(model) if probe_sets else {})  # saved weights
    report["seconds"] = round(time.time() - t0, 1)
    model.config.dropout_rate = a.dropout  # the saved config: what delta tuning runs with
    save_backbone(model.cpu(), tok, tmp, dtype=torch.bfloat16)  # half the size; loaded back as float32
    (tmp / "pretrain_report.json").write_text(json.dumps(report, indent=1))
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the finished folder appears at once; an interrupted run leaves only .partial
    order = report["upstream_order_sensitivity"]
    print(f"{out}: {report['parameters']:,} parameters, vocabulary {len(tok)}; held-out span-corruption loss "
          f"{report['heldout_loss_random_init']:.3f} at random init -> {report['heldout_loss']:.3f} "
          f"after {report['updates']} updates ({report['seconds']:.0f}s)"
          + (f"; order sensitivity on upstream dev rows {order:.3f} (0: blind to word order)" if up_dev else ""))
    for row in probed:
        scores = " ".join(f"{t} {100 * v:.1f}" for t, v in row["probe"].items())
        saved = "  <- saved" if row["step"] == report["kept_update"] else ""
        print(f"  update {row['step']:>6}: upstream dev {scores} (mean {100 * row['probe_mean']:.1f}){saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: a tiny T5 + tokenizer built locally (no downloads) and a small task folder."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread is faster than two (thread overhead dominates), and the
# command-line runs the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_TASKS = ("babi-qa1", "babi-qa6", "csqa2")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """Folder with a 2+2-layer, d_model 32 T5 and a 300-piece unigram tokenizer (+100 sentinels)."""
    from pewe.backbone import build_model, save_backbone, small_config, train_tokenizer
    from pewe.data import read_tsv, source_text

    texts = []
    for task in TINY_TASKS:
        for ex in read_tsv(REPO / "data" / "fewshot" / task / f"{task}_64_42_train.tsv"):
            texts += [source_text(task, ex.input), *ex.answers]
    tok = train_tokenizer(texts, vocab_size=300)
    cfg = small_config(tok, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
    return save_backbone(build_model(cfg, seed=0), tok, tmp_path_factory.mktemp("tiny-t5"))


def write_task(root, task, train, dev, test, prefix=None):
    """A CrossFit task folder from lists of (input, answer...) tuples."""
    prefix = prefix or f"{task}_64_42"
    d = Path(root) / task
    d.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("dev", dev), ("test", test)):
        (d / f"{prefix}_{split}.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory):
    """The first 16 train / 8 dev / 8 test rows of three bundled few-shot tasks."""
    from pewe.data import read_tsv

    root = tmp_path_factory.mktemp("tasks")
    for task in TINY_TASKS:
        src = REPO / "data" / "fewshot" / task
        rows = {s: [(e.input, *e.answers) for e in read_tsv(src / f"{task}_64_42_{s}.tsv")]
                for s in ("train", "dev", "test")}
        write_task(root, task, rows["train"][:16], rows["dev"][:8], rows["test"][:8])
    return root

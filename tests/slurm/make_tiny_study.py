"""Build the inputs of the tiny study that tests/slurm/run_test.sh runs on a single-node Slurm.

    python tests/slurm/make_tiny_study.py OUT_DIR

Writes OUT_DIR/backbone (a 2+2-layer, d_model 32 T5 and a 300-piece tokenizer, as tests/conftest.py's
``tiny_backbone``) and OUT_DIR/tasks (the first 16 train / 8 dev / 8 test rows of two bundled
few-shot tasks, as ``tiny_tasks``), which serves as both the source and the target task folder.
"""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

TASKS = ("babi-qa1", "csqa2")  # the study's two tasks: each a source and a target
ROWS = {"train": 16, "dev": 8, "test": 8}  # rows kept per split


def write_tasks(root: Path):
    from pewe.atomic import atomic_write_text
    from pewe.data import read_tsv

    for task in TASKS:
        src = REPO / "data" / "fewshot" / task
        for split, n in ROWS.items():
            rows = read_tsv(src / f"{task}_64_42_{split}.tsv")[:n]
            text = "".join("\t".join((ex.input, *ex.answers)) + "\n" for ex in rows)
            atomic_write_text(root / task / f"{task}_64_42_{split}.tsv", text)


def write_backbone(out: Path):
    from pewe.backbone import build_model, save_backbone, small_config, train_tokenizer
    from pewe.data import read_tsv, source_text

    texts = []
    for task in TASKS:
        for ex in read_tsv(REPO / "data" / "fewshot" / task / f"{task}_64_42_train.tsv"):
            texts += [source_text(task, ex.input), *ex.answers]
    tok = train_tokenizer(texts, vocab_size=300)
    cfg = small_config(tok, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
    save_backbone(build_model(cfg, seed=0), tok, out)


def main(argv):
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    write_tasks(out / "tasks")
    write_backbone(out / "backbone")
    print(f"tiny study inputs: {out}/backbone, {out}/tasks ({' '.join(TASKS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

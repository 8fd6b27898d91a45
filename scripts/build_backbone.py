"""Build the embedded default backbone: a unigram tokenizer trained on the bundled train splits and a
small T5 v1.1-style model (randomly initialised), saved as a Hugging Face folder.

    python scripts/build_backbone.py                # -> data/t5-mini
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pewe.model import REPO  # noqa: E402

output_dir = str(REPO / "data" / "t5-mini")  # where the model and tokenizer folder goes
text_dirs = [str(REPO / "data" / "full")]  # task folders whose *_train.tsv files train the tokenizer
vocab_size = 4000  # unigram pieces (plus 100 <extra_id_N> sentinels)
d_model = 256  # hidden size
d_ff = 640  # feed-forward width (gated-gelu, as T5 v1.1)
num_layers = 3  # encoder layers (and as many decoder layers)
num_heads = 4  # attention heads
d_kv = 64  # size of each head
seed = 0  # seed of the random initialisation


def main(argv=None):
    from pewe.backbone import build_model, save_backbone, small_config, train_tokenizer
    from pewe.configurator import configure
    from pewe.data import read_tsv, source_text

    a = configure(globals(), __file__, argv)
    texts = []
    for d in a.text_dirs:
        for f in sorted(Path(d).glob("*/*_train.tsv")):
            task = f.parent.name
            for ex in read_tsv(f):  # train splits only: dev and test never shape the backbone
                texts.append(source_text(task, ex.input))  # as the model sees it: " [task] input"
                texts.extend(ex.answers)
    if not texts:
        print(f"error: no *_train.tsv under {a.text_dirs}", file=sys.stderr)
        return 1
    tok = train_tokenizer(texts, a.vocab_size)
    cfg = small_config(tok, a.d_model, a.d_ff, a.num_layers, a.num_heads, a.d_kv)
    model = build_model(cfg, a.seed)
    out = save_backbone(model, tok, a.output_dir)
    print(f"{out}: {model.num_parameters():,} parameters, vocabulary {len(tok)} ({len(texts):,} training texts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

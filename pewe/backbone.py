"""Building a small T5 v1.1-style backbone and a T5-style tokenizer locally (no hub access).

Used for the embedded default (``data/t5-mini``) and, much smaller, for the tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import SentencePieceUnigramTokenizer
from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer
from transformers.models.t5.modeling_t5 import T5Attention

SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5


def train_tokenizer(texts, vocab_size=4000, extra_ids=100):
    """A unigram (SentencePiece-style) tokenizer with T5's special tokens and ``extra_ids`` sentinels."""
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>",
                           show_progress=False)
    vocab = [(piece, float(score)) for piece, score in json.loads(sp.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=extra_ids)


def small_config(tokenizer, d_model=256, d_ff=640, num_layers=3, num_heads=4, d_kv=64, dropout=0.1):
    return T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                    num_decoder_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                    dropout_rate=dropout, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)


def build_model(config, seed=0):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def recency_bias_init(model):
    """Start every relative-position bias table at ALiBi's recency prior (Press et al., 2022): head h
    of H adds -2^(-8h/H) x (mean token distance of the bucket) to its attention logits. A randomly
    initialised table (std d_model^-0.5) starts blind to word order, and whether pretraining
    discovers order was found to vary from run to run (docs/BACKBONE.md)."""
    for module in model.modules():
        if not (isinstance(module, T5Attention) and module.has_relative_attention_bias):
            continue
        n, far = module.relative_attention_num_buckets, module.relative_attention_max_distance
        bidirectional = not module.is_decoder
        rel = torch.arange(-2 * far, 2 * far + 1 if bidirectional else 1)  # key minus query position
        buckets = module._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=n,
                                                   max_distance=far)
        counts = torch.bincount(buckets, minlength=n).clamp(min=1)
        dist = torch.zeros(n).index_add_(0, buckets, rel.abs().float()) / counts  # mean distance per bucket
        heads = module.n_heads
        slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
        with torch.no_grad():
            module.relative_attention_bias.weight.copy_(-dist[:, None] * slopes[None, :])  # (buckets, heads)
    return model


def save_backbone(model, tokenizer, out_dir, dtype=torch.float32):
    """Save model and tokenizer; ``dtype=torch.bfloat16`` halves the file. The config still says
    float32, so a plain ``T5ForConditionalGeneration.from_pretrained(out_dir)`` (transformers 5 loads
    the dtype the config names) gives float32 parameters, as pewe.model.load_backbone does."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    config = json.loads((out_dir / "config.json").read_text())
    config["dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # tokenising with max_length leaves that truncation set on the fast backend, and tokenizer.json
    # would keep it: a reloaded backend would cut every text at that length
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.save_pretrained(out_dir)
    return out_dir

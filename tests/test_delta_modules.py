"""Delta modules checked against hand computations and an independent prefix-attention reference."""
import math

import pytest
import torch
from torch.nn import functional as F
from transformers import T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

import delta_modules as dm


def tiny_config(**kw):
    base = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                dropout_rate=0.0, initializer_factor=4.0)
    base.update(kw)
    return T5Config(**base)


def tiny_model(method=None, seed=0, **delta):
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(tiny_config()).eval()
    if method:
        dm.attach_delta(model, dm.DeltaConfig(method, **delta))
    if method == "prefix":  # large enough prefix keys/values to matter next to initializer_factor=4 keys
        with torch.no_grad():
            for stack in (model.encoder, model.decoder):
                stack.prefix.up.weight.mul_(30)
    return model


T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False)


@pytest.mark.parametrize("method", dm.METHODS)
def test_paper_sizes_on_t5_base_shape(method):
    with torch.device("meta"):  # shapes only: no 250M-parameter allocation
        plain = T5ForConditionalGeneration(T5Config(**T5_BASE))
        model = T5ForConditionalGeneration(T5Config(**T5_BASE))
    base_keys = set(plain.state_dict())
    dm.attach_delta(model, dm.DeltaConfig(method))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    delta = {n for n, _ in dm.delta_named_parameters(model)}
    assert trainable == delta
    assert dm.count_delta_parameters(model) == 1_105_920
    assert all(method in n for n in delta)
    # base parameters keep their stock names and stay frozen
    assert base_keys == set(model.state_dict()) - delta
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in delta)


def test_pfeiffer_only_after_ffn():
    model = tiny_model("adapter", adapter_type="pfeiffer", adapter_size=3)
    names = [n for n, _ in dm.delta_named_parameters(model)]
    assert names and all("DenseReluDense.adapter" in n for n in names)
    assert len(names) == 2 * (2 + 2)  # down/up per FFN of 2 encoder + 2 decoder blocks
    assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.adapter.act, torch.nn.ReLU)


def test_lora_output_by_hand():
    model = tiny_model("lora", lora_r=3, lora_alpha=6)
    q = model.decoder.block[1].layer[1].EncDecAttention.q  # a cross-attention site
    torch.nn.init.normal_(q.lora.B)
    x = torch.randn(2, 5, 32)
    expected = x @ q.weight.T + (6 / 3) * (x @ q.lora.A.T) @ q.lora.B.T
    torch.testing.assert_close(q(x), expected)
    # every attention (enc self, dec self, dec cross) has LoRA on q and v only
    sites = {n.rsplit(".lora.", 1)[0].rsplit(".", 1)[-1] for n, _ in dm.delta_named_parameters(model)}
    assert sites == {"q", "v"}
    assert len(dm.delta_named_parameters(model)) == 2 * 2 * (2 + 2 * 2)


def test_lora_init_follows_original():
    model = tiny_model("lora", lora_r=4, lora_alpha=8)
    lora = model.encoder.block[0].layer[0].SelfAttention.q.lora
    assert torch.count_nonzero(lora.B) == 0
    bound = 1 / math.sqrt(32)  # kaiming-uniform(a=sqrt 5) over fan_in = in_features
    assert lora.A.abs().max() <= bound and lora.A.abs().max() > 0.5 * bound


def test_adapter_output_by_hand():
    model = tiny_model("adapter", adapter_size=5)
    ff = model.encoder.block[0].layer[1].DenseReluDense
    x = torch.randn(3, 4, 32)
    with torch.no_grad():
        h = ff.wo(F.gelu(ff.wi_0(x), approximate="tanh") * ff.wi_1(x))  # T5 v1.1 gated-gelu FFN
        expected = h + F.silu(h @ ff.adapter.down) @ ff.adapter.up
        torch.testing.assert_close(ff(x), expected)
    o = model.decoder.block[0].layer[1].EncDecAttention.o
    y = torch.randn(2, 32)
    with torch.no_grad():
        h = y @ o.weight.T
        torch.testing.assert_close(o(y), h + F.silu(h @ o.adapter.down) @ o.adapter.up)
    assert abs(ff.adapter.down.std().item() - 0.02) < 0.01


def test_zero_lora_is_a_no_op():
    torch.manual_seed(1)
    x = torch.randint(2, 64, (2, 6))
    dec = torch.randint(2, 64, (2, 4))
    plain = tiny_model()
    lora = tiny_model("lora")
    # no_grad: with trainable LoRA inputs the attention kernel may take another (equally valid) path
    with torch.no_grad():
        ref = plain(input_ids=x, decoder_input_ids=dec).logits
        assert torch.equal(lora(input_ids=x, decoder_input_ids=dec).logits, ref)


# ----------------------------------------------------------------------------- prefix

def reference_encoder_layer0(model, ids, mask):
    """Encoder block 0 with a prefix, written from the original's semantics: prefix key j at
    position j, real token t at P + t; prefix keys always visible; T5 scores are unscaled."""
    enc = model.encoder
    attn = enc.block[0].layer[0].SelfAttention
    H, dkv = attn.n_heads, attn.key_value_proj_dim
    pk, pv = enc.prefix.compute()[0]  # (H, P, dkv) each
    P = pk.shape[1]
    h = enc.embed_tokens(ids)  # (B, T, d)
    normed = enc.block[0].layer[0].layer_norm(h)
    B, T, _ = h.shape
    split = lambda t: t.view(B, T, H, dkv).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.q(normed)), split(attn.k(normed)), split(attn.v(normed))
    k = torch.cat([pk.expand(B, -1, -1, -1), k], 2)
    v = torch.cat([pv.expand(B, -1, -1, -1), v], 2)
    qpos = torch.arange(T) + P
    kpos = torch.arange(P + T)
    bucket = T5Attention._relative_position_bucket(kpos[None, :] - qpos[:, None], bidirectional=True,
                                                   num_buckets=attn.relative_attention_num_buckets,
                                                   max_distance=attn.relative_attention_max_distance)
    bias = attn.relative_attention_bias(bucket).permute(2, 0, 1)  # (H, T, P+T)
    keep = torch.cat([torch.ones(B, P), mask.float()], 1)  # (B, P+T)
    scores = q @ k.transpose(-1, -2) + bias + (1 - keep[:, None, None, :]) * torch.finfo(torch.float32).min
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * dkv)
    h = h + attn.o(out)
    return enc.block[0].layer[1](h)  # FFN sublayer, untouched by the prefix


def test_prefix_encoder_layer0_matches_reference():
    model = tiny_model("prefix", prefix_num=5, prefix_r=7)
    ids = torch.randint(2, 64, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    got = {}

    def grab(module, inputs, output):
        got["h"] = output[0] if isinstance(output, tuple) else output

    model.encoder.block[0].register_forward_hook(grab)
    with torch.no_grad():
        model.encoder(input_ids=ids, attention_mask=mask)
        ref = reference_encoder_layer0(model, ids, mask)
    torch.testing.assert_close(got["h"][0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["h"][1, :4], ref[1, :4], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the check has teeth: without the prefix layer 0 differs clearly
        plain = T5ForConditionalGeneration(tiny_config()).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        h0 = plain.encoder.block[0](plain.encoder.embed_tokens(ids))
        h0 = h0[0] if isinstance(h0, tuple) else h0
    assert (h0[0] - ref[0]).abs().max() > 0.1


def test_prefix_changes_the_output_and_padding_is_masked():
    model = tiny_model("prefix", prefix_num=4, prefix_r=6)
    ids = torch.randint(2, 64, (1, 5))
    with torch.no_grad():
        full = model.encoder(input_ids=ids).last_hidden_state
        padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
        padded = model.encoder(input_ids=padded_ids,
                               attention_mask=torch.tensor([[1] * 5 + [0] * 3])).last_hidden_state
        torch.testing.assert_close(padded[:, :5], full, rtol=1e-4, atol=1e-4)  # padding stays invisible
        model.encoder.prefix.embedding.mul_(-1)
        assert not torch.allclose(model.encoder(input_ids=ids).last_hidden_state, full, atol=1e-4)


def test_prefix_cached_generate_matches_teacher_forcing():
    model = tiny_model("prefix", prefix_num=6, prefix_r=5)
    ids = torch.randint(2, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=1,
                             min_new_tokens=6, output_logits=True, return_dict_in_generate=True)
        step_logits = torch.stack(out.logits, 1)  # (B, steps, V) from the cached decoder
        forced = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1]).logits
    torch.testing.assert_close(step_logits, forced, rtol=1e-3, atol=1e-3)  # logits are O(100) here
    assert torch.equal(forced.argmax(-1), out.sequences[:, 1:])
    assert len(set(out.sequences[0, 1:].tolist())) > 1  # a non-degenerate check


def test_prefix_view_is_the_originals_plain_view():
    model = tiny_model("prefix", prefix_num=3, prefix_r=4)
    p = model.decoder.prefix
    with torch.no_grad():
        flat = p.up(torch.tanh(p.down(p.embedding)))  # (P, L*2*d_model)
        torch.testing.assert_close(p.compute(), flat.reshape(2, 2, 4, 3, 8))


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("method", dm.METHODS)
def test_checkpoint_round_trip(tmp_path, method):
    a = tiny_model(method, seed=1)
    for _, p in dm.delta_named_parameters(a):
        torch.nn.init.normal_(p.data)
    path = tmp_path / "d.safetensors"
    dm.save_delta(path, dm.delta_state_dict(a), a.delta_config, task="t")
    assert (tmp_path / "d.json").exists()
    b = tiny_model(method, seed=1)  # same base, its own fresh delta
    for _, p in dm.delta_named_parameters(b):
        torch.nn.init.normal_(p.data)
    meta = dm.load_delta(b, path)
    assert meta["task"] == "t"
    for (n1, p1), (n2, p2) in zip(dm.delta_named_parameters(a), dm.delta_named_parameters(b)):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randint(2, 64, (1, 5))
    d = torch.randint(2, 64, (1, 3))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=x, decoder_input_ids=d).logits, b(input_ids=x, decoder_input_ids=d).logits)
    from safetensors.torch import load_file
    assert set(load_file(str(path))) == {n for n, _ in dm.delta_named_parameters(a)}  # delta tensors only


def test_loading_a_different_delta_config_fails_clearly(tmp_path):
    a = tiny_model("adapter", adapter_size=4)
    path = tmp_path / "a.safetensors"
    dm.save_delta(path, dm.delta_state_dict(a), a.delta_config)
    with pytest.raises(dm.DeltaError, match=r"a\.safetensors.*adapter_size.*4.*does not match.*12"):
        dm.load_delta(tiny_model("adapter", adapter_size=12), path)
    with pytest.raises(dm.DeltaError, match="does not match"):
        dm.load_delta(tiny_model("lora"), path)
    other = T5ForConditionalGeneration(tiny_config(d_model=48, d_kv=12)).eval()
    dm.attach_delta(other, dm.DeltaConfig("adapter", adapter_size=4))
    with pytest.raises(dm.DeltaError, match="shape"):
        dm.load_delta(other, path)


def test_missing_sidecar_and_garbage_are_refused(tmp_path):
    a = tiny_model("lora")
    path = tmp_path / "x.safetensors"
    dm.save_delta(path, dm.delta_state_dict(a), a.delta_config)
    (tmp_path / "x.json").unlink()
    with pytest.raises(dm.DeltaError, match="x.json is missing"):
        dm.read_delta(path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    (tmp_path / "bad.json").write_text('{"delta": {"method": "lora"}}')
    with pytest.raises(dm.DeltaError, match="bad.safetensors: not a readable"):
        dm.read_delta(bad)

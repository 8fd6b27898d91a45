"""peft LoRA folders in and out, checked against peft itself on tiny T5s built here.

A peft LoRA trained a few steps and read here gives peft's logits; ours written as a peft folder
loads in ``PeftModel.from_pretrained`` with our logits; rslora and wider ``target_modules`` round-trip;
what a plain LoRA on every block cannot hold is refused with one line naming the field; the entry
points take folders of peft folders as their sources.
"""
import json
import os
import pickle
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import T5ForConditionalGeneration

import delta_modules as dm
from conftest import REPO, TINY_TASKS
from pewe import layout as L
from test_delta_modules import tiny_config

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # from peft
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "unit_model"))
sys.path.insert(0, str(REPO / "get_similarity"))
import convert_peft  # noqa: E402

RELU = {"feed_forward_proj": "relu"}  # a T5 with a plain FFN (wi, wo); tiny_config's is gated (wi_0, wi_1, wo)


def base_model(seed=0, **config):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(tiny_config(**config)).eval()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(2, 64, (3, 4), generator=g)}


def logits(model, seed=0):
    with torch.no_grad():
        return model(**batch(seed)).logits


def trained_peft(folder, model_config=None, steps=3, **lora):
    """A peft LoRA on a tiny T5, trained ``steps`` AdamW steps (so A and B both moved), saved to ``folder``."""
    model = peft.get_peft_model(base_model(**(model_config or {})),
                                peft.LoraConfig(task_type="SEQ_2_SEQ_LM", lora_dropout=0.0, **lora))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        model(**batch(step + 10)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(str(folder))
    return model


def ours_from(folder, model_config=None):
    _, config, _ = dm.read_delta(folder)
    model = dm.attach_delta(base_model(**(model_config or {})), config)
    dm.load_delta(model, folder)
    return model


def peft_tensors(folder):
    return load_file(str(folder / dm.PEFT_WEIGHTS))


# --------------------------------------------------------------------------- peft -> ours -> peft

def test_trained_peft_lora_gives_the_same_logits_here(tmp_path):
    theirs = trained_peft(tmp_path / "a", r=4, lora_alpha=8, target_modules=["q", "v"])
    tensors, config, meta = dm.read_delta(tmp_path / "a")
    assert config == dm.DeltaConfig("lora", lora_r=4, lora_alpha=8) and config.lora_scale == 2.0
    assert meta["format"] == "peft" and meta["peft_weights"] == dm.PEFT_WEIGHTS
    # the key mapping, one by one: base_model.model.{path}.lora_A.weight <-> {path}.lora.A
    raw = peft_tensors(tmp_path / "a")
    assert len(raw) == len(tensors) == 2 * 2 * (2 + 2 * 2)
    for key, value in tensors.items():
        path, factor = key.rsplit(".lora.", 1)
        assert torch.equal(value, raw[f"base_model.model.{path}.lora_{factor}.weight"])
    ours = ours_from(tmp_path / "a")
    assert not torch.allclose(logits(ours), logits(base_model()), atol=1e-3)  # the LoRA matters
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_ours_exported_loads_in_peft_with_the_same_logits(tmp_path):
    ours = dm.attach_delta(base_model(), dm.DeltaConfig("lora", lora_r=3, lora_alpha=6))
    with torch.no_grad():
        for _, p in dm.delta_named_parameters(ours):
            p.normal_(0, 0.3)
    dm.write_peft(tmp_path / "out", dm.delta_state_dict(ours), ours.delta_config, base_model="tiny-t5")
    cfg = json.loads((tmp_path / "out" / dm.PEFT_CONFIG).read_text())
    assert {k: cfg[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "use_rslora",
                                "base_model_name_or_path", "lora_dropout", "bias", "fan_in_fan_out")} == {
        "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": 3, "lora_alpha": 6, "target_modules": ["q", "v"],
        "use_rslora": False, "base_model_name_or_path": "tiny-t5", "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False}
    with safe_open(str(tmp_path / "out" / dm.PEFT_WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    theirs = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "out")).eval()
    assert not torch.allclose(logits(ours), logits(base_model()), atol=1e-3)
    torch.testing.assert_close(logits(theirs, 1), logits(ours, 1), rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob(".out.*"))  # the folder was built beside and renamed: no leftovers


ROUND_TRIPS = {
    "rslora": ({}, dict(r=4, lora_alpha=8, target_modules=["q", "v"], use_rslora=True)),
    "attention and gated FFN": ({}, dict(r=3, lora_alpha=6, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"])),
    "plain FFN": (RELU, dict(r=2, lora_alpha=4, target_modules=["k", "o", "wi", "wo"])),
    "all-linear, rslora": ({}, dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    "a regex": ({}, dict(r=2, lora_alpha=2, target_modules=r".*\.(SelfAttention|EncDecAttention)\.(q|v)")),
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_rslora_and_wider_targets_round_trip(tmp_path, name):
    model_config, lora = ROUND_TRIPS[name]
    theirs = trained_peft(tmp_path / "in", model_config, **lora)
    _, config, _ = dm.read_delta(tmp_path / "in")
    assert config.lora_rslora == lora.get("use_rslora", False)
    divisor = lora["r"] ** 0.5 if config.lora_rslora else lora["r"]
    assert config.lora_scale == pytest.approx(lora["lora_alpha"] / divisor)
    want = {n.rsplit(".", 1)[1] for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert set(config.lora_targets) == want
    ours = ours_from(tmp_path / "in", model_config)
    assert not torch.allclose(logits(ours), logits(base_model(**model_config)), atol=1e-3)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    # ... and back: the same tensors under the same keys, peft loads them with the same logits
    dm.write_peft(tmp_path / "back", dm.delta_state_dict(ours), config)
    before, after = peft_tensors(tmp_path / "in"), peft_tensors(tmp_path / "back")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    again = peft.PeftModel.from_pretrained(base_model(**model_config), str(tmp_path / "back")).eval()
    assert again.peft_config["default"].use_rslora == config.lora_rslora
    torch.testing.assert_close(logits(again, 2), logits(theirs, 2), rtol=1e-5, atol=1e-5)


def test_our_wider_lora_matches_peft_on_the_same_factors(tmp_path):
    """Our own attach of a non-default LoRA (rslora, q k v o wi wo) computes what peft computes."""
    config = dm.DeltaConfig("lora", lora_r=4, lora_alpha=8, lora_targets=["wo", "q", "k", "v", "o", "wi"],
                            lora_rslora=True)
    ours = dm.attach_delta(base_model(**RELU), config)
    with torch.no_grad():
        for _, p in dm.delta_named_parameters(ours):
            p.normal_(0, 0.3)
    dm.write_peft(tmp_path / "p", dm.delta_state_dict(ours), config)
    theirs = peft.PeftModel.from_pretrained(base_model(**RELU), str(tmp_path / "p")).eval()
    layers = [m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(layers) == 2 * 4 * (1 + 2) + 2 * 2 * 2  # q k v o per attention, wi wo per FFN
    assert all(m.scaling["default"] == pytest.approx(8 / 4 ** 0.5) for m in layers)
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- what cannot be represented

def run_convert(*argv):
    return convert_peft.main([str(a) for a in argv] + ["--progress=false"])


def test_dora_is_refused_with_one_line(tmp_path, capsys):
    trained_peft(tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q", "v"], use_dora=True)
    with pytest.raises(dm.DeltaError, match="use_dora = True cannot be represented here"):
        dm.read_delta(tmp_path / "dora")
    assert run_convert("--from_peft", tmp_path / "dora", "--to", tmp_path / "x.safetensors") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "use_dora" in err and "DoRA" in err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.json").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")  # peft's own warnings about these very options
@pytest.mark.parametrize("lora,field", [
    (dict(lora_bias=True), "lora_bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(layers_to_transform=[0], layers_pattern="block"), "layers_to_transform"),
    (dict(rank_pattern={"q": 2}), "rank_pattern"),
    (dict(alpha_pattern={"v": 32}), "alpha_pattern"),
    (dict(exclude_modules=r".*EncDecAttention.*"), "leaves decoder.block.0.layer.1.EncDecAttention.q without LoRA"),
])
def test_what_peft_saves_but_cannot_be_represented_is_refused(tmp_path, lora, field):
    trained_peft(tmp_path / "p", steps=1, **{"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], **lora})
    with pytest.raises(dm.DeltaError) as e:
        dm.read_delta(tmp_path / "p")
    assert field in str(e.value) and "\n" not in str(e.value)


def test_equal_patterns_are_read(tmp_path):
    """A rank_pattern / alpha_pattern that gives every layer the same value is one rank and one alpha."""
    trained_peft(tmp_path / "p", steps=1, r=4, lora_alpha=8, target_modules=["q", "v"],
                 rank_pattern={"q": 2, "v": 2}, alpha_pattern={".*": 6})
    _, config, _ = dm.read_delta(tmp_path / "p")
    assert (config.lora_r, config.lora_alpha) == (2, 6)
    torch.testing.assert_close(logits(ours_from(tmp_path / "p")),
                               logits(peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "p")).eval()))


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain") / "p"
    trained_peft(folder, steps=1, r=4, lora_alpha=8, target_modules=["q", "v"])
    return folder


def edited_copy(src, dst, config_changes=None, tensors=None):
    dst.mkdir(parents=True)
    cfg = {**json.loads((src / dm.PEFT_CONFIG).read_text()), **(config_changes or {})}
    (dst / dm.PEFT_CONFIG).write_text(json.dumps(cfg))
    save_file(tensors if tensors is not None else peft_tensors(src), str(dst / dm.PEFT_WEIGHTS))
    return dst


@pytest.mark.parametrize("change,field", [
    ({"peft_type": "LOHA"}, "peft_type 'LOHA'"),
    ({"task_type": "SEQ_CLS"}, "task_type 'SEQ_CLS'"),
    ({"bias": "all"}, "bias = 'all'"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights = 'pissa'"),
    ({"target_modules": ["q_proj", "v_proj"]}, "target_modules ['q_proj', 'v_proj']"),
    ({"r": 8}, "r / rank_pattern say rank 8"),
    ({"some_new_field": 3}, "some_new_field = 3 is not known"),
])
def test_config_fields_that_do_not_fit_are_refused(plain_folder, tmp_path, change, field):
    with pytest.raises(dm.DeltaError) as e:
        dm.read_delta(edited_copy(plain_folder, tmp_path / "e", change))
    assert field in str(e.value) and str(e.value).startswith(str(tmp_path / "e")) and "\n" not in str(e.value)


def test_a_lora_of_another_model_family_is_refused(plain_folder, tmp_path):
    llama = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)}
    folder = edited_copy(plain_folder, tmp_path / "llama", {"target_modules": None}, llama)
    with pytest.raises(dm.DeltaError, match="not a lora_A / lora_B weight of a T5 Linear"):
        dm.read_delta(folder)
    dora = {**peft_tensors(plain_folder), "base_model.model.encoder.block.0.layer.0.SelfAttention.q"
            ".lora_magnitude_vector": torch.ones(32)}  # DoRA's tensor under a config that does not say so
    with pytest.raises(dm.DeltaError, match="DoRA's magnitude"):
        dm.read_delta(edited_copy(plain_folder, tmp_path / "dora", {}, dora))


def test_an_unknown_or_missing_target_layer_is_one_line():
    with pytest.raises(dm.DeltaError, match="lora_targets 'qq': not a T5 Linear layer"):
        dm.DeltaConfig("lora", lora_targets=["q", "qq"])
    with pytest.raises(dm.DeltaError, match=r"lora_targets wi_0: this T5 has no wi_0 .*they have wi, wo"):
        dm.attach_delta(base_model(**RELU), dm.DeltaConfig("lora", lora_targets=["q", "wi_0"]))
    with pytest.raises(dm.DeltaError, match="lora_targets wi: this T5 has no wi .*they have wi_0, wi_1, wo"):
        dm.attach_delta(base_model(), dm.DeltaConfig("lora", lora_targets="wi"))


# --------------------------------------------------------------------------- adapter_model.bin

class Reducer:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but code: weights_only must refuse to call it


def test_adapter_model_bin_only_when_asked(plain_folder, tmp_path, monkeypatch, capsys):
    old = tmp_path / "old"
    old.mkdir()
    (old / dm.PEFT_CONFIG).write_text((plain_folder / dm.PEFT_CONFIG).read_text())
    torch.save(peft_tensors(plain_folder), old / dm.PEFT_PICKLE)
    monkeypatch.delenv(dm.PEFT_BIN_ENV, raising=False)
    with pytest.raises(dm.DeltaError, match="a pickle; read with torch.load.weights_only=True.*--allow_bin"):
        dm.read_delta(old)
    want = dm.read_delta(plain_folder)[0]
    got, config, meta = dm.read_delta(old, allow_bin=True)
    assert meta["peft_weights"] == dm.PEFT_PICKLE and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    monkeypatch.setenv(dm.PEFT_BIN_ENV, "1")  # for entry points that pass no allow_bin
    assert dm.read_delta(old)[1] == config
    monkeypatch.delenv(dm.PEFT_BIN_ENV)
    assert run_convert("--from_peft", old, "--to", tmp_path / "no.safetensors") == 1
    assert "pickle" in capsys.readouterr().err and not (tmp_path / "no.safetensors").exists()
    assert run_convert("--from_peft", old, "--to", tmp_path / "yes.safetensors", "--allow_bin") == 0
    assert dm.read_delta(tmp_path / "yes.safetensors")[1] == config
    # code inside the pickle is refused, not run
    with open(old / dm.PEFT_PICKLE, "wb") as f:
        pickle.dump({"x": Reducer()}, f, protocol=2)  # torch.save's protocol
    with pytest.raises(dm.DeltaError, match="not readable as tensors with torch.load.weights_only=True"):
        dm.read_delta(old, allow_bin=True)


def test_help_states_why_bin_needs_the_option(capsys):
    with pytest.raises(SystemExit) as e:
        convert_peft.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--allow_bin" in out and dm.PICKLE_REASON in out and "--from_peft" in out and "--to_peft" in out


# --------------------------------------------------------------------------- config compatibility

def test_a_default_lora_records_what_it_always_did(tmp_path):
    config = dm.DeltaConfig("lora")
    assert config.fields() == {"method": "lora", "lora_r": 10, "lora_alpha": 16}  # as in run.json records before
    assert "lora_targets" not in config.to_dict() and "lora_rslora" not in config.to_dict()
    # a sidecar written before the new fields existed reads back as the same config
    save_file({"x": torch.zeros(1)}, str(tmp_path / "old.safetensors"))
    old = {"method": "lora", "adapter_type": "houlsby", "adapter_size": 12, "lora_r": 10, "lora_alpha": 16,
           "prefix_num": 120, "prefix_r": 24}
    (tmp_path / "old.json").write_text(json.dumps({"delta": old}))
    found = dm.read_delta(tmp_path / "old.safetensors")[1]
    assert found == config
    dm.check_compatible(config, found, "old")
    assert dm.DeltaConfig("lora", lora_targets=("v", "q")) == config  # kept in module order
    wide = dm.DeltaConfig("lora", lora_targets=["q", "k", "v", "o"], lora_rslora=True)
    assert wide.fields() == {"method": "lora", "lora_r": 10, "lora_alpha": 16, "lora_targets": ["q", "k", "v", "o"],
                             "lora_rslora": True}
    assert dm.DeltaConfig.from_dict(json.loads(json.dumps(wide.to_dict()))) == wide
    with pytest.raises(dm.DeltaError, match="does not match"):
        dm.check_compatible(config, wide, "wide")


def test_lora_modules_are_made_in_module_order():
    """The attach order decides the random init: q, v of each attention in turn, as always; wider
    targets go q k v o per attention, then the FFN's, sublayer by sublayer."""
    names = [n for n, _ in dm.delta_named_parameters(dm.attach_delta(base_model(), dm.DeltaConfig("lora")))]
    sites = [f"{s}.block.{b}.layer.{i}.{m}" for s, layers in
             (("encoder", ((0, "SelfAttention"),)), ("decoder", ((0, "SelfAttention"), (1, "EncDecAttention"))))
             for b in range(2) for i, m in layers]
    assert names == [f"{site}.{q}.lora.{f}" for site in sites for q in ("q", "v") for f in ("A", "B")]
    torch.manual_seed(5)
    a = dm.delta_state_dict(dm.attach_delta(base_model(), dm.DeltaConfig("lora", lora_r=2)))
    torch.manual_seed(5)
    b = dm.delta_state_dict(dm.attach_delta(base_model(), dm.DeltaConfig("lora", lora_r=2, lora_targets=["v", "q"])))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    wide = [n for n, _ in dm.delta_named_parameters(dm.attach_delta(base_model(**RELU), dm.DeltaConfig(
        "lora", lora_targets=["wo", "k", "wi", "q"])))]
    assert [n.rsplit(".lora.", 1)[0] for n in wide[:12:2]] == [
        "encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.k",
        "encoder.block.0.layer.1.DenseReluDense.wi", "encoder.block.0.layer.1.DenseReluDense.wo",
        "encoder.block.1.layer.0.SelfAttention.q", "encoder.block.1.layer.0.SelfAttention.k"]


def test_loras_with_different_targets_are_not_averaged(plain_folder, tmp_path):
    from pewe.averaging import weighted_average

    trained_peft(tmp_path / "wide", steps=1, r=4, lora_alpha=8, target_modules=["q", "k", "v"])
    with pytest.raises(dm.DeltaError, match="cannot be averaged"):
        weighted_average([(plain_folder, 0.5), (tmp_path / "wide", 0.5)])


# --------------------------------------------------------------------------- source folders

def test_source_folders_list_peft_folders_too(plain_folder, tmp_path):
    root = tmp_path / "sources"
    edited_copy(plain_folder, root / "a")
    dm.save_delta(root / "b" / "checkpoint-best.safetensors", dm.read_delta(plain_folder)[0], dm.DeltaConfig(
        "lora", lora_r=4, lora_alpha=8))
    (root / "c").mkdir()  # neither: not a source
    assert L.source_checkpoints(root) == {"a": root / "a", "b": root / "b" / "checkpoint-best.safetensors"}
    assert L.find_checkpoint(root / "a") == root / "a" and L.test_checkpoint_for(root, "a") == root / "a"
    assert L.init_checkpoint_for(root / "a", "x") == root / "a" and L.init_checkpoint_for(root, "a") == root / "a"
    edited_copy(plain_folder, tmp_path / "both")
    dm.save_delta(tmp_path / "both" / "checkpoint-best.safetensors", {"x": torch.zeros(1)}, dm.DeltaConfig("lora"))
    with pytest.raises(dm.DeltaError, match="holds both a peft adapter"):
        L.find_checkpoint(tmp_path / "both")
    before = L.file_sha256(root / "a")  # the checksum a run record keeps of its init
    t = peft_tensors(root / "a")
    t[next(iter(t))][0, 0] += 1
    save_file(t, str(root / "a" / dm.PEFT_WEIGHTS))
    assert L.file_sha256(root / "a") != before


# --------------------------------------------------------------------------- entry points on the tiny backbone

@pytest.fixture(scope="module")
def peft_sources(tiny_backbone, tmp_path_factory):
    """A folder of peft LoRA folders, one per tiny task, on the tiny backbone: r 4, alpha 8, on q, v
    and the FFN's wo, random B (as after some training)."""
    root = tmp_path_factory.mktemp("peft_sources")
    for i, task in enumerate(TINY_TASKS):
        model = peft.get_peft_model(T5ForConditionalGeneration.from_pretrained(str(tiny_backbone)), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q", "v", "wo"], task_type="SEQ_2_SEQ_LM"))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        model.save_pretrained(str(root / task))
    return root


def test_unit_model_average_of_peft_sources_exported_loads_in_peft(tiny_backbone, tiny_tasks, peft_sources, tmp_path):
    import unit_model_average

    out = tmp_path / "average"
    assert unit_model_average.main(["--delta", "lora", "--source_ckpt_path",
                                    str(peft_sources), "--save_ckpt_path", str(out)]) == 0
    target, others = TINY_TASKS[0], TINY_TASKS[1:]
    init = load_file(str(L.init_path(out, target)))
    raw = [peft_tensors(peft_sources / s) for s in others]
    for key, value in init.items():
        path, factor = key.rsplit(".lora.", 1)
        peft_key = f"base_model.model.{path}.lora_{factor}.weight"
        torch.testing.assert_close(value, sum(r[peft_key] for r in raw) / len(raw))
    # the averaged initialisation, written in peft format, loads in PeftModel with our logits
    assert run_convert("--to_peft", out, "--out", tmp_path / "peft", "--base_model", "tiny") == 0
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == sorted(TINY_TASKS)
    ours, _ = __import__("pewe.model", fromlist=["load_backbone"]).load_backbone(str(tiny_backbone))
    dm.attach_delta(ours, dm.read_delta(L.init_path(out, target))[1])
    dm.load_delta(ours.eval(), L.init_path(out, target))
    theirs = peft.PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(str(tiny_backbone)),
                                            str(tmp_path / "peft" / target)).eval()
    ids = {"input_ids": torch.tensor([[5, 6, 7, 8, 1]]), "labels": torch.tensor([[9, 10, 1]])}
    with torch.no_grad():
        torch.testing.assert_close(theirs(**ids).logits, ours(**ids).logits, rtol=1e-5, atol=1e-5)


def test_similarity_of_peft_sources_equals_that_of_their_conversion(tiny_backbone, tiny_tasks, peft_sources, tmp_path):
    import get_Loss

    assert run_convert("--from_peft", peft_sources, "--to", tmp_path / "converted") == 0
    assert sorted(L.source_checkpoints(tmp_path / "converted")) == sorted(TINY_TASKS)
    tables = []
    for name, sources in (("peft", peft_sources), ("ours", tmp_path / "converted")):
        assert get_Loss.main(["--task_dir", str(tiny_tasks), "--source_checkpoint_path", str(sources), "--output_dir",
                              str(tmp_path / name), "--model", str(tiny_backbone), "--tokenizer_path",
                              str(tiny_backbone), "--precision", "fp32", "--device", "cpu", "--quiet",
                              "--predict_batch_size", "8", "--tune_method", "lora", "--lora_r", "4",
                              "--lora_alpha", "8"]) == 0
        tables.append(L.read_similarity(tmp_path / name / "result.tsv"))
    assert tables[0] == tables[1] and list(tables[0]) == list(TINY_TASKS)
    assert len({s for row in tables[0].values() for s in row.values()}) > 1  # the sources differ
    # and the converted collection back to peft folders: the very tensors peft saved
    assert run_convert("--to_peft", tmp_path / "converted", "--out", tmp_path / "again") == 0
    for task in TINY_TASKS:
        before, after = peft_tensors(peft_sources / task), peft_tensors(tmp_path / "again" / task)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_study_with_a_folder_of_peft_sources(tiny_backbone, tiny_tasks, peft_sources, tmp_path, capsys):
    import run_study

    def argv(out, *targets):
        return ["--model", str(tiny_backbone), "--tokenizer_path", str(tiny_backbone), "--tasks", *TINY_TASKS,
                "--source_task_dir", str(tiny_tasks), "--target_task_dir", str(tiny_tasks), "--output_dir", str(out),
                "--methods", "lora", "--source_dir", str(peft_sources), "--lora_r", "4", "--lora_alpha", "8",
                "--lora_targets", *targets, "--seeds", "42", "--step_budgets", "0", "2", "--scores", "Loss",
                "--inits", "average", "--target_train_iters", "2", "--valid_interval", "2", "--log_interval", "2",
                "--early_stop", "0", "--predict_batch_size", "16", "--max_output_length", "8", "--sim_batch_size",
                "8", "--device", "cpu", "--precision", "fp32", "--quiet", "--progress=false"]

    out = tmp_path / "study"
    assert run_study.main(argv(out, "q", "v", "wo")) == 0
    inits = sorted((out / "lora" / "init").glob("*/without_*_checkpoint.safetensors"))
    assert {p.parent.name for p in inits} == {"average", "Loss"} and len(inits) == 2 * len(TINY_TASKS)
    average = load_file(str(out / "lora" / "init" / "average" / f"without_{TINY_TASKS[0]}_checkpoint.safetensors"))
    raw = [peft_tensors(peft_sources / s) for s in TINY_TASKS[1:]]
    key = "decoder.block.1.layer.2.DenseReluDense.wo.lora.B"
    torch.testing.assert_close(average[key], sum(r[f"base_model.model.{key[:-7]}.lora_B.weight"] for r in raw) / 2)
    results = list((out / "lora" / "targets").glob("*/seed_42/*/runs/*/result.json"))
    assert len(results) == 3 * len(TINY_TASKS) and (out / "report.md").is_file()  # random, average, Loss
    # a study whose LoRA differs from the sources' is refused, naming the field
    capsys.readouterr()
    assert run_study.main(argv(tmp_path / "other", "q", "v")) == 1
    assert "lora_targets" in capsys.readouterr().err


def test_tune_from_and_test_with_a_peft_folder(tiny_backbone, tiny_tasks, peft_sources, tmp_path):
    import tune_hps_singletask

    common = ["--task_dir", str(tiny_tasks), "--tasks", "csqa2", "--model", str(tiny_backbone), "--tokenizer_path",
              str(tiny_backbone), "--tune_method", "lora", "--lora_r", "4", "--lora_alpha", "8", "--lora_targets",
              "q", "v", "wo", "--predict_batch_size", "8", "--max_output_length", "8", "--precision", "fp32",
              "--device", "cpu", "--quiet", "--progress=false"]
    assert tune_hps_singletask.main(common + ["--do_predict", "--test_checkpoint", str(peft_sources),
                                              "--output_dir", str(tmp_path / "test")]) == 0
    result = json.loads(next((tmp_path / "test").glob("csqa2/runs/*/result.json")).read_text())
    assert result["test_checkpoint"] == str(peft_sources / "csqa2")
    assert tune_hps_singletask.main(common + ["--do_train", "--train_iters", "2", "--valid_interval", "2",
                                              "--train_checkpoint", str(peft_sources / "babi-qa1"),
                                              "--output_dir", str(tmp_path / "train")]) == 0
    run = next((tmp_path / "train").glob("csqa2/runs/*"))
    assert json.loads((run / "run.json").read_text())["train_checkpoint"] == L.file_sha256(peft_sources / "babi-qa1")
    assert json.loads((run / "result.json").read_text())["init"] == str(peft_sources / "babi-qa1")

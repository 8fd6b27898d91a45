"""Our LoRA against peft's, an independent implementation: same factors -> same logits and gradients.

peft keeps ``lora_A`` as Linear(in, r) (weight (r, in)) and ``lora_B`` as Linear(r, out) (weight
(out, r)), scaled by alpha / r: the same layout and scale as ``delta_modules.LoRA`` (A (r, in),
B (out, r)), so the values are copied as they are.
"""
import pytest
import torch

import delta_modules as dm
from test_delta_modules import tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # from peft

R, ALPHA = 4, 16


def lora_pair(seed=0):
    """(ours, peft's) on two copies of the same tiny T5, peft's factors copied into ours.

    B is made non-zero (both start at zeros) so that the delta changes the logits at all."""
    ours = tiny_model("lora", seed=seed, lora_r=R, lora_alpha=ALPHA)
    theirs = peft.get_peft_model(tiny_model(seed=seed),
                                 peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q", "v"], lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    pairs = {}  # our module path -> peft's LoRA-carrying Linear
    for name, module in theirs.base_model.model.named_modules():
        if hasattr(module, "lora_A"):
            with torch.no_grad():
                module.lora_B["default"].weight.normal_(0, 0.5, generator=g)
            pairs[name] = module
    ours_lora = {n[: -len(".lora")]: m for n, m in ours.named_modules() if isinstance(m, dm.LoRA)}
    assert set(pairs) == set(ours_lora) and len(pairs) == 2 * (2 + 2 + 2)  # q, v of enc self, dec self, dec cross
    with torch.no_grad():
        for name, module in pairs.items():
            ours_lora[name].A.copy_(module.lora_A["default"].weight)  # (r, in)
            ours_lora[name].B.copy_(module.lora_B["default"].weight)  # (out, r)
            assert ours_lora[name].scale == module.scaling["default"] == ALPHA / R
    return ours, theirs, ours_lora, pairs


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # one padded row
    labels = torch.randint(2, 64, (3, 4), generator=g)
    labels[2, 3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_same_factors_give_same_logits():
    ours, theirs, _, _ = lora_pair()
    plain = tiny_model(seed=0)
    inputs = batch()
    with torch.no_grad():
        a, b, base = ours(**inputs).logits, theirs(**inputs).logits, plain(**inputs).logits
    assert not torch.allclose(a, base, atol=1e-3)  # the delta does change the output
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_same_factors_give_same_gradients():
    ours, theirs, ours_lora, pairs = lora_pair(seed=3)
    inputs = batch(seed=3)
    ours(**inputs).loss.backward()
    theirs(**inputs).loss.backward()
    for name, module in pairs.items():
        torch.testing.assert_close(ours_lora[name].A.grad, module.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours_lora[name].B.grad, module.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
    # the same trainable set: only the LoRA factors
    ours_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    theirs_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert ours_trainable == theirs_trainable == dm.count_delta_parameters(ours)

"""peft LoRA folders in and out, for a T5: read one as this project's delta, write one that
``peft.PeftModel.from_pretrained`` loads with the same outputs.

peft saves a LoRA as adapter_config.json + adapter_model.safetensors (older versions: the pickle
adapter_model.bin), keys ``base_model.model.{module path}.lora_A.weight`` (r, in) and
``.lora_B.weight`` (out, r), scale lora_alpha / r (alpha / sqrt(r) with use_rslora). Ours:
``{module path}.lora.A`` (r, in) / ``.lora.B`` (out, r), the same values. What a plain A, B LoRA on
every block cannot hold (DoRA, a LoRA bias, modules_to_save, ...) is refused naming the field.
Standalone beside ``delta_modules``, as it is: it imports nothing of the ``pewe`` package.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load, save

from delta_modules import (ATTENTION_LINEARS, FFN_LINEARS, LORA_TARGETS, DeltaConfig, DeltaError, check_finite,
                           write_file_atomically)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"  # older peft folders (LoraHub's modules, 2023)
PEFT_BIN_ENV = "PEWE_ALLOW_PEFT_BIN"  # "1": read adapter_model.bin where the caller passes no allow_bin
PICKLE_REASON = "a pickle; read with torch.load(weights_only=True), which refuses code but is still a pickle format"
_SITE = (r"(?:encoder|decoder)\.block\.\d+\.layer\.\d+\."
         r"(?:(?:SelfAttention|EncDecAttention)\.(?:q|k|v|o)|DenseReluDense\.(?:wi|wi_0|wi_1|wo))")
_OUR_KEY = re.compile(rf"({_SITE})\.lora\.(A|B)")
_PEFT_KEY = re.compile(rf"base_model\.model\.({_SITE})\.lora_(A|B)\.weight")
# where each T5 stack keeps its sublayers: (layer index, module) per block
_STACK_SITES = {"encoder": ((0, "SelfAttention"), (1, "DenseReluDense")),
                "decoder": ((0, "SelfAttention"), (1, "EncDecAttention"), (2, "DenseReluDense"))}
# adapter_config.json fields with no bearing on what the saved tensors compute
_PEFT_IGNORED = {"base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
                 "lora_dropout",  # training only
                 "layers_pattern",  # used only with layers_to_transform (refused)
                 "megatron_core", "runtime_config", "qalora_group_size", "ensure_weight_tying", "merge_weights",
                 "loftq_config", "eva_config", "corda_config", "lora_ga_config",  # inits (see _PEFT_INITS)
                 "exclude_modules"}  # its effect is in the keys (checked: every block of a target)
# fields that must be off: what each one would add that a plain A, B LoRA on every block cannot hold
_PEFT_REFUSED = {
    "use_dora": "DoRA adds a magnitude vector to every layer",
    "lora_bias": "a bias on lora_B",
    "bias": "peft also trains the base layers' biases",
    "modules_to_save": "full copies of other layers are trained and saved",
    "layers_to_transform": "LoRA on some blocks only",
    "layer_replication": "it repeats blocks of the base model",
    "fan_in_fan_out": "transposed (Conv1D, GPT-2 style) weights",
    "trainable_token_indices": "trained token embeddings",
    "target_parameters": "LoRA on raw parameters",
    "alora_invocation_tokens": "activated LoRA acts only after its invocation tokens",
    "use_qalora": "QA-LoRA pools its input",
    "enable_lora": "LoRA on parts of a merged projection",
    "megatron_config": "Megatron parallel layers",
    **{k: "a LoRA variant" for k in ("velora_config", "monteclora_config", "use_bdlora", "arrow_config",
                                     "kasa_config")},
}
# initialisations after which the saved A, B are all there is; the others (pissa, olora, corda,
# loftq, lora_ga) change the base model's weights, which the adapter folder does not hold
_PEFT_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def is_peft_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / PEFT_CONFIG).is_file()


def peft_weights_path(folder):
    """The weights file peft itself would load: adapter_model.safetensors, else adapter_model.bin (None: neither)."""
    for name in (PEFT_WEIGHTS, PEFT_PICKLE):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def _unset(value) -> bool:
    return value is None or value is False or value == [] or value == {} or value == "none"


def _pattern_value(patterns: dict, site: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key (a regex) that matches the whole
    module path, or its end after a dot, gives the value."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", site):
            return value
    return default


def _check_peft_fields(cfg: dict, where):
    """Refuse, with one line naming the field, what a plain LoRA on a T5 cannot represent."""
    if cfg.get("peft_type") != "LORA":
        raise DeltaError(f"{where}: peft_type {cfg.get('peft_type')!r}: only LORA adapters are read")
    if cfg.get("task_type") not in (None, "SEQ_2_SEQ_LM"):
        raise DeltaError(f"{where}: task_type {cfg['task_type']!r}: only a T5 for SEQ_2_SEQ_LM is read")
    for name, reason in _PEFT_REFUSED.items():
        if not _unset(cfg.get(name)):
            raise DeltaError(f"{where}: {name} = {cfg[name]!r} cannot be represented here ({reason}); "
                             f"only plain LoRA A, B factors are read")
    init = cfg.get("init_lora_weights", True)
    if init not in _PEFT_INITS:
        raise DeltaError(f"{where}: init_lora_weights = {init!r}: that initialisation changes the base model's "
                         f"weights (or is unknown here), and the folder holds only the adapter")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        odd = [t for t in targets if t not in LORA_TARGETS]
        if odd:
            raise DeltaError(f"{where}: target_modules {odd}: not T5 Linear layer names ({', '.join(LORA_TARGETS)}); "
                             f"only LoRAs of a T5 are read (base model {cfg.get('base_model_name_or_path')!r})")
    known = {"peft_type", "task_type", "init_lora_weights", "target_modules", "r", "lora_alpha", "use_rslora",
             "rank_pattern", "alpha_pattern", *_PEFT_IGNORED, *_PEFT_REFUSED}
    for name, value in cfg.items():
        if name not in known and not _unset(value):
            raise DeltaError(f"{where}: {name} = {value!r} is not known to this reader (a newer peft?); "
                             f"it may change what the adapter computes")


def _peft_tensors(weights: Path, allow_bin):
    if weights.name == PEFT_WEIGHTS:
        try:
            return load(weights.read_bytes())
        except Exception as e:  # safetensors raises its own error types
            raise DeltaError(f"{weights}: not a readable safetensors file ({e})") from None
    allowed = os.environ.get(PEFT_BIN_ENV, "") == "1" if allow_bin is None else bool(allow_bin)
    if not allowed:
        raise DeltaError(f"{weights}: {PICKLE_REASON}; read only when asked: scripts/convert_peft.py --allow_bin "
                         f"(converts it once), or {PEFT_BIN_ENV}=1 for any entry point")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error, a truncated file
        raise DeltaError(f"{weights}: not readable as tensors with torch.load(weights_only=True) ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise DeltaError(f"{weights}: not a dict of named tensors")
    return state


def _check_every_block(sites: set, where, target_modules):
    """The LoRA'd layers must be, for each layer name, that layer of every block of both stacks."""
    names = {s.rsplit(".", 1)[1] for s in sites}
    blocks = {stack: 1 + max((int(s.split(".")[2]) for s in sites if s.startswith(stack + ".")), default=-1)
              for stack in _STACK_SITES}
    want = set()
    for stack, layers in _STACK_SITES.items():
        for b in range(blocks[stack]):
            for i, module in layers:
                kind = FFN_LINEARS if module == "DenseReluDense" else ATTENTION_LINEARS
                want.update(f"{stack}.block.{b}.layer.{i}.{module}.{n}" for n in kind if n in names)
    missing, extra = sorted(want - sites), sorted(sites - want)
    if extra:
        raise DeltaError(f"{where}: {extra[0]} is not where a T5 keeps that layer; only LoRAs of a T5 are read")
    if missing or not all(blocks.values()):
        first = missing[0] if missing else f"the {'encoder' if not blocks['encoder'] else 'decoder'}"
        raise DeltaError(f"{where}: target_modules {target_modules!r} leaves {first} without LoRA; this project's "
                         f"LoRA wraps its layers in every block (layers_to_transform / exclude_modules are not read)")


def read_peft(folder, allow_bin=None):
    """(tensors in this project's key layout, DeltaConfig, meta) of a peft LoRA folder of a T5.

    The weights come from ``adapter_model.safetensors``; ``adapter_model.bin`` (when it is the only
    one) only with ``allow_bin`` (None: the ``PEWE_ALLOW_PEFT_BIN=1`` environment variable), since it
    is a pickle. What a plain LoRA on every block cannot hold is refused with one line naming the field."""
    folder = Path(folder)
    cfg_path = folder / PEFT_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8-sig"))
        if not isinstance(cfg, dict):
            raise TypeError(f"a {type(cfg).__name__}, not an object")
    except (ValueError, TypeError) as e:
        raise DeltaError(f"{cfg_path}: not a readable peft config ({e})") from None
    _check_peft_fields(cfg, cfg_path)
    weights = peft_weights_path(folder)
    if weights is None:
        raise DeltaError(f"{folder}: no {PEFT_WEIGHTS} (or {PEFT_PICKLE}) beside {PEFT_CONFIG}")
    factors = {}  # {module path: {"A": (r, in), "B": (out, r)}}
    for key, value in _peft_tensors(weights, allow_bin).items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            what = ("DoRA's magnitude (use_dora)" if "lora_magnitude_vector" in key
                    else "not a lora_A / lora_B weight of a T5 Linear")
            raise DeltaError(f"{weights}: tensor {key}: {what}; only plain LoRAs of a T5 are read")
        factors.setdefault(m.group(1), {})[m.group(2)] = value
    if not factors:
        raise DeltaError(f"{weights}: no LoRA tensors")
    _check_every_block(set(factors), cfg_path, cfg.get("target_modules"))
    r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)  # peft's defaults
    ranks, alphas = {}, {}
    for site, f in factors.items():
        if set(f) != {"A", "B"} or f["A"].dim() != 2 or f["B"].dim() != 2 or f["A"].shape[0] != f["B"].shape[1]:
            raise DeltaError(f"{weights}: {site}: expected lora_A (r, in) and lora_B (out, r), found "
                             f"{ {k: tuple(v.shape) for k, v in f.items()} }")
        want_r = _pattern_value(cfg.get("rank_pattern") or {}, site, r_default)
        if f["A"].shape[0] != want_r:
            raise DeltaError(f"{cfg_path}: r / rank_pattern say rank {want_r} for {site}, its tensors have "
                             f"rank {f['A'].shape[0]}")
        ranks[site] = want_r
        alphas[site] = _pattern_value(cfg.get("alpha_pattern") or {}, site, alpha_default)
    for field, values in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        if len(set(values.values())) > 1:
            raise DeltaError(f"{cfg_path}: {field} {cfg.get(field)!r} gives the layers different values "
                             f"({sorted(set(values.values()))}); this project's LoRA has one rank and one alpha")
    use_rslora = cfg.get("use_rslora") or False
    if not isinstance(use_rslora, bool):
        raise DeltaError(f"{cfg_path}: use_rslora must be true or false, not {use_rslora!r}")
    try:
        config = DeltaConfig("lora", lora_r=next(iter(ranks.values())), lora_alpha=next(iter(alphas.values())),
                             lora_targets=sorted({s.rsplit(".", 1)[1] for s in factors}), lora_rslora=use_rslora)
    except DeltaError as e:
        raise DeltaError(f"{cfg_path}: {e}") from None
    tensors = {f"{site}.lora.{k}": v for site, f in factors.items() for k, v in sorted(f.items())}
    check_finite(tensors, weights)
    meta = {"format": "peft", "base_model": cfg.get("base_model_name_or_path"), "peft_folder": str(folder),
            "peft_weights": weights.name, "peft_config": cfg}
    return tensors, config, meta


def peft_config_of(config: DeltaConfig, base_model=None) -> dict:
    """The adapter_config.json of a LoRA ``config``, as peft reads it."""
    return {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": base_model,
            "r": config.lora_r, "lora_alpha": config.lora_alpha, "use_rslora": config.lora_rslora,
            "target_modules": list(config.lora_targets), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True}


def write_peft(folder, tensors: dict, config: DeltaConfig, base_model=None) -> Path:
    """Write a LoRA delta as a peft adapter folder (adapter_config.json + adapter_model.safetensors)
    that ``PeftModel.from_pretrained`` loads. The folder is built beside ``folder`` and renamed into
    place: a reader sees the old folder or the new one, never half of one. An existing ``folder``
    must be a peft folder (replaced whole) or empty. ``base_model``: its base_model_name_or_path."""
    folder = Path(folder)
    if config.method != "lora":
        raise DeltaError(f"{folder}: only a LoRA delta can be written as a peft adapter, not a {config.method} one")
    state = {}
    for key, value in tensors.items():
        m = _OUR_KEY.fullmatch(key)
        if m is None:
            raise DeltaError(f"{folder}: tensor {key} is not a LoRA factor of a T5 Linear; nothing written")
        state[f"base_model.model.{m.group(1)}.lora_{m.group(2)}.weight"] = value.detach().to("cpu").contiguous()
    names = tuple(n for n in LORA_TARGETS if any(k.endswith(f".{n}.lora.A") for k in tensors))
    if names != config.lora_targets:
        raise DeltaError(f"{folder}: the tensors wrap {list(names)}, the config says lora_targets "
                         f"{list(config.lora_targets)}; nothing written")
    check_finite(state, f"{folder}: not written")
    if folder.exists() and not (is_peft_folder(folder) or (folder.is_dir() and not any(folder.iterdir()))):
        raise DeltaError(f"{folder}: exists and is not a peft adapter folder; not overwritten")
    files = {PEFT_CONFIG: json.dumps(peft_config_of(config, base_model), indent=2).encode(),
             PEFT_WEIGHTS: save(state, metadata={"format": "pt"})}
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, data in files.items():
            write_file_atomically(tmp / name, data)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


__all__ = ["read_peft", "write_peft", "is_peft_folder", "peft_weights_path", "peft_config_of", "PEFT_CONFIG",
           "PEFT_WEIGHTS", "PEFT_PICKLE", "PEFT_BIN_ENV", "PICKLE_REASON"]

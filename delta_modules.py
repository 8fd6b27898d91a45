"""Delta modules (adapter, LoRA, prefix) for a frozen, stock Hugging Face T5.

Nothing of transformers' T5 code is copied. Each delta is registered as a child module of the layer
it changes, so the base model keeps its stock parameter names and "every parameter under a delta
module" is the trainable set:

- adapter: a forward hook on ``SelfAttention.o`` / ``EncDecAttention.o`` / ``DenseReluDense``
  (houlsby) or on ``DenseReluDense`` only (pfeiffer) adds ``up(act(down(h)))`` to the sublayer
  output h, before T5's dropout and residual.
- LoRA: a forward hook on chosen T5 Linear layers adds ``scale * x A^T B^T``: by default ``q`` and
  ``v`` of every attention (encoder self, decoder self, decoder cross); any of ``q k v o`` (every
  attention) and ``wi wi_0 wi_1 wo`` (every feed-forward) with ``lora_targets``.
- prefix: a registered attention function (``transformers.AttentionInterface``) prepends each
  self-attention layer's prefix keys/values, with the position bias of P earlier tokens.

Checkpoints hold only delta tensors (``safetensors``) plus a JSON sidecar with the delta config.
A LoRA also reads from and writes to a peft adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``): ``read_delta`` takes such a folder wherever it takes a checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import weakref
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from safetensors.torch import load, save
from torch import nn
from transformers import AttentionInterface
from transformers.models.t5.modeling_t5 import eager_attention_forward

METHODS = ("adapter", "lora", "prefix")
SHAPE_FIELDS = {"adapter": ("adapter_type", "adapter_size"),
                "lora": ("lora_r", "lora_alpha", "lora_targets", "lora_rslora"),
                "prefix": ("prefix_num", "prefix_r")}  # what each method's tensors (and their meaning) depend on
# Fields added after checkpoints and run records were first written without them: they are recorded
# (in fields() and the sidecar) only when they differ from these defaults, so what a default delta
# records is what it recorded before they existed, and older records still compare equal.
LATER_FIELDS = {"lora_targets": ("q", "v"), "lora_rslora": False}
ATTENTION_LINEARS = ("q", "k", "v", "o")  # of every T5Attention (encoder self, decoder self, decoder cross)
FFN_LINEARS = ("wi", "wi_0", "wi_1", "wo")  # of every DenseReluDense (wi: plain FFN; wi_0, wi_1: gated)
LORA_TARGETS = ATTENTION_LINEARS + FFN_LINEARS  # what a LoRA may wrap, in module order
ADAPTER_TYPES = {"houlsby": nn.SiLU, "pfeiffer": nn.ReLU}
PREFIX_ATTENTION = "pewe_prefix_eager"


class DeltaError(ValueError):
    """A delta config or checkpoint that does not fit the model or the request."""


@dataclasses.dataclass(frozen=True)
class DeltaConfig:
    method: str
    adapter_type: str = "houlsby"
    adapter_size: int = 12
    lora_r: int = 10
    lora_alpha: int = 16
    prefix_num: int = 120
    prefix_r: int = 24
    lora_targets: tuple = ("q", "v")  # the T5 Linear layers a LoRA wraps (kept in LORA_TARGETS order)
    lora_rslora: bool = False  # scale alpha / sqrt(r) (rank-stabilised LoRA, peft's use_rslora), not alpha / r

    def __post_init__(self):
        if self.method not in METHODS:
            raise DeltaError(f"unknown delta method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method == "adapter" and self.adapter_type not in ADAPTER_TYPES:
            raise DeltaError(f"unknown adapter_type {self.adapter_type!r}; expected houlsby or pfeiffer")
        for name in ("adapter_size", "lora_r", "prefix_num", "prefix_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DeltaError(f"{name} must be a whole number >= 1, not {value!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise DeltaError(f"lora_alpha must be a positive number, not {alpha!r}")
        object.__setattr__(self, "lora_targets", _lora_targets(self.lora_targets))
        if not isinstance(self.lora_rslora, bool):
            raise DeltaError(f"lora_rslora must be true or false, not {self.lora_rslora!r}")

    @property
    def lora_scale(self) -> float:
        """What a LoRA's ``x A^T B^T`` is multiplied by: alpha / r, or alpha / sqrt(r) with lora_rslora."""
        return self.lora_alpha / (math.sqrt(self.lora_r) if self.lora_rslora else self.lora_r)

    def fields(self) -> dict:
        """The fields that shape this method's tensors (what two deltas must share to be averaged),
        as JSON values; a LATER_FIELDS field appears only when it differs from its default."""
        return {"method": self.method, **_recorded({k: getattr(self, k) for k in SHAPE_FIELDS[self.method]})}

    def to_dict(self) -> dict:
        """Every field, as the sidecar records it (LATER_FIELDS only where they differ from their default)."""
        return _recorded(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "DeltaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _lora_targets(value) -> tuple:
    """``lora_targets`` (a list, a tuple, or "q,v" / "q v") as a tuple in LORA_TARGETS order."""
    names = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise DeltaError(f"lora_targets must be a list of T5 layer names, not {value!r}")
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown:
        raise DeltaError(f"lora_targets {', '.join(map(repr, unknown))}: not a T5 Linear layer this LoRA can wrap; "
                         f"expected some of {', '.join(LORA_TARGETS)}")
    if not names or len(set(names)) != len(names):
        raise DeltaError(f"lora_targets must name each layer once and at least one, not {list(names)}")
    return tuple(n for n in LORA_TARGETS if n in names)


def _recorded(fields: dict) -> dict:
    """``fields`` as written to JSON records: tuples as lists, LATER_FIELDS at their default left out."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()
            if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


# --------------------------------------------------------------------------- modules

class Adapter(nn.Module):
    """Bottleneck ``act(h @ down) @ up``; both matrices normal(0, 0.02), no bias, as the original."""

    def __init__(self, dim: int, size: int, adapter_type: str):
        super().__init__()
        self.down = nn.Parameter(torch.empty(dim, size))  # (d_model, size)
        self.up = nn.Parameter(torch.empty(size, dim))  # (size, d_model)
        self.act = ADAPTER_TYPES[adapter_type]()
        nn.init.normal_(self.down, std=0.02)
        nn.init.normal_(self.up, std=0.02)

    def forward(self, h):
        return self.act(h @ self.down.to(h.dtype)) @ self.up.to(h.dtype)


class LoRA(nn.Module):
    """``scale * x A^T B^T`` with A (r, in) kaiming-uniform(a=sqrt 5), B (out, r) zeros; scale is
    alpha / r, or alpha / sqrt(r) with ``rslora``."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: int, rslora: bool = False):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, r))
        self.scale = alpha / (math.sqrt(r) if rslora else r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x):
        return (x @ self.A.to(x.dtype).t() @ self.B.to(x.dtype).t()) * self.scale


class Prefix(nn.Module):
    """One per T5 stack: P vectors -> Linear(d_model, r) -> tanh -> Linear(r, L*2*d_model), no biases.

    The MLP output (P, L*2*d_model) is cut into per-layer keys/values with a plain ``view`` to
    (L, 2, H, P, d_kv), without a permute, exactly as the original does (so each layer's prefix key j
    mixes rows of the MLP output; it is a fixed reparametrisation, kept for faithfulness).
    """

    def __init__(self, d_model: int, num_layers: int, num_heads: int, d_kv: int, num: int, r: int):
        super().__init__()
        self.shape = (num_layers, 2, num_heads, num, d_kv)
        self.embedding = nn.Parameter(torch.randn(num, d_model))  # (P, d_model), as nn.Embedding's init
        self.down = nn.Linear(d_model, r, bias=False)
        self.up = nn.Linear(r, num_layers * 2 * num_heads * d_kv, bias=False)
        self._kv = None  # (L, 2, H, P, d_kv), computed once per stack forward

    def compute(self):
        return self.up(torch.tanh(self.down(self.embedding))).view(self.shape)

    def layer_kv(self, layer_idx: int):
        if self._kv is None:  # called outside a stack forward (e.g. a test on one layer)
            return self.compute()[layer_idx]
        return self._kv[layer_idx]


DELTA_TYPES = (Adapter, LoRA, Prefix)


# --------------------------------------------------------------------------- hooks

def _adapter_hook(module, inputs, output):
    return output + module.adapter(output)


def _lora_hook(module, inputs, output):
    return output + module.lora(inputs[0])


def _prefix_stack_pre_hook(stack, args, kwargs):
    stack.prefix._kv = stack.prefix.compute()


def _prefix_stack_hook(stack, args, kwargs, output):
    stack.prefix._kv = None  # do not keep the graph alive between forwards
    return output


def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     position_bias=None, **kwargs):
    """T5's eager attention with this layer's prefix keys/values prepended (self-attention only).

    query (B, H, q, d_kv); key/value (B, H, k, d_kv), k = cached + current tokens; the prefix is
    added here, after the cache update, so the decoder cache never holds it. Prefix key j sits at
    position j and real token t at P + t: real-real distances are unchanged, and the prefix columns
    of the bias come from the stack's layer-0 ``compute_bias``.
    """
    ref = getattr(module, "_pewe_prefix", None)
    if ref is not None:
        stack, layer_idx = ref[0](), ref[1]
        pk, pv = stack.prefix.layer_kv(layer_idx).to(key.dtype)  # (H, P, d_kv) each, or (B, H, P, d_kv): one per row
        batch, num = key.shape[0], pk.shape[-2]
        if pk.dim() == 3:  # the same prefix for every row (pewe.stacked gives each row its own run's)
            pk, pv = pk.unsqueeze(0).expand(batch, -1, -1, -1), pv.unsqueeze(0).expand(batch, -1, -1, -1)
        key = torch.cat([pk, key], dim=2)
        value = torch.cat([pv, value], dim=2)
        q_len, k_len = query.shape[2], key.shape[2] - num
        past = k_len - q_len  # tokens already in the decoder cache (0 in the encoder)
        first = stack.block[0].layer[0].SelfAttention
        cols = first.compute_bias(q_len, num, device=query.device, past_seen_tokens=past + num)
        if position_bias is not None:
            cols = cols.to(position_bias.dtype).expand(position_bias.shape[0], -1, -1, -1)
            position_bias = torch.cat([cols, position_bias], dim=-1)
        if attention_mask is not None:
            pad = attention_mask.new_zeros(*attention_mask.shape[:-1], num)  # additive mask: 0 = attend
            attention_mask = torch.cat([pad, attention_mask], dim=-1)
    return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                   dropout=dropout, position_bias=position_bias, **kwargs)


def _register_prefix_attention():
    # Older T5 code (seen with 5.17) does not call registered attention functions: the prefix would
    # silently do nothing. 5.24 is the version this was built and tested on.
    if Version(transformers.__version__) < Version("5.24"):
        raise DeltaError(f"prefix deltas need transformers >= 5.24 (found {transformers.__version__})")
    from transformers.masking_utils import AttentionMaskInterface, eager_mask  # after the check: older versions lack it

    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
    # Without a mask function under the same name every padding and causal mask silently vanishes.
    AttentionMaskInterface.register(PREFIX_ATTENTION, eager_mask)


# --------------------------------------------------------------------------- attach

def _stacks(model):
    return [model.encoder, model.decoder]


def _sublayers(model):
    """(layer, its T5Attention or None for the FFN layer) in module order: encoder self-attention, FFN;
    decoder self-attention, cross-attention, FFN; block by block."""
    for stack in _stacks(model):
        for block in stack.block:
            for layer in block.layer:
                yield layer, getattr(layer, "SelfAttention", None) or getattr(layer, "EncDecAttention", None)


def _attach_adapters(model, config: DeltaConfig):
    """houlsby: after every attention output projection and every FFN; pfeiffer: after every FFN.
    Created in module order, so a seed gives the same initial adapters as it always has."""
    for layer, attn in _sublayers(model):
        if attn is None:
            site = layer.DenseReluDense
        elif config.adapter_type == "houlsby":
            site = attn.o
        else:
            continue
        site.adapter = Adapter(model.config.d_model, config.adapter_size, config.adapter_type)
        site.register_forward_hook(_adapter_hook)


def _lora_sites(model, targets) -> list:
    """The Linear layers named by ``targets`` in module order (sublayer by sublayer, each in
    LORA_TARGETS order: with q, v that is q then v of every attention, the order the random init
    of a seed has always been drawn in). A name the model lacks is refused before anything is made."""
    sites = []
    for layer, attn in _sublayers(model):
        owner, names = (attn, ATTENTION_LINEARS) if attn is not None else (layer.DenseReluDense, FFN_LINEARS)
        for name in (n for n in names if n in targets):
            lin = getattr(owner, name, None)
            if not isinstance(lin, nn.Linear):
                has = ", ".join(n for n in FFN_LINEARS if isinstance(getattr(owner, n, None), nn.Linear))
                raise DeltaError(f"lora_targets {name}: this T5 has no {name} in its feed-forward layers "
                                 f"(they have {has}; feed_forward_proj {model.config.feed_forward_proj!r})")
            sites.append(lin)
    return sites


def _attach_lora(model, config: DeltaConfig):
    for lin in _lora_sites(model, config.lora_targets):
        lin.lora = LoRA(lin.in_features, lin.out_features, config.lora_r, config.lora_alpha, config.lora_rslora)
        lin.register_forward_hook(_lora_hook)


def _attach_prefix(model, config: DeltaConfig):
    c = model.config
    _register_prefix_attention()
    for stack in _stacks(model):
        stack.prefix = Prefix(c.d_model, len(stack.block), c.num_heads, c.d_kv, config.prefix_num, config.prefix_r)
        stack.register_forward_pre_hook(_prefix_stack_pre_hook, with_kwargs=True)
        stack.register_forward_hook(_prefix_stack_hook, with_kwargs=True)
        for i, block in enumerate(stack.block):
            # a weak reference, so the stack is not registered as a child of its own attention
            block.layer[0].SelfAttention._pewe_prefix = (weakref.ref(stack), i)
    model.set_attn_implementation(PREFIX_ATTENTION)


ATTACH = {"adapter": _attach_adapters, "lora": _attach_lora, "prefix": _attach_prefix}


def attach_delta(model, config: DeltaConfig):
    """Freeze ``model`` and attach the delta described by ``config``; returns the model."""
    if getattr(model, "delta_config", None) is not None:
        raise DeltaError(f"model already carries a {model.delta_config.method} delta")
    for p in model.parameters():
        p.requires_grad_(False)
    ATTACH[config.method](model, config)
    model.delta_config = config
    model.to(next(model.parameters()).device)
    for _, p in delta_named_parameters(model):
        p.requires_grad_(True)
    return model


def delta_named_parameters(model):
    """(name, parameter) of every parameter under a delta module, in module order."""
    out = []
    for mname, module in model.named_modules():
        if isinstance(module, DELTA_TYPES):
            out.extend((f"{mname}.{n}", p) for n, p in module.named_parameters())
    return out


def delta_state_dict(model) -> dict:
    return {n: p.detach() for n, p in delta_named_parameters(model)}


def count_delta_parameters(model) -> int:
    return sum(p.numel() for _, p in delta_named_parameters(model))


# --------------------------------------------------------------------------- checkpoints

def write_file_atomically(path, data: bytes):
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over
    ``path``: a reader, or a run resumed after a kill, sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk or a read-only folder: say which file could not be written
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _sidecar(path) -> Path:
    return Path(path).with_suffix(".json")


def check_finite(tensors: dict, where):
    """Refuse a delta with a NaN or an infinity: averaged or trained from, it would spread silently."""
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise DeltaError(f"{where}: tensor {k} holds non-finite values (NaN or infinity)")


def save_delta(path, state: dict, config: DeltaConfig, **meta):
    """Write ``path`` (.safetensors, delta tensors only) and its ``.json`` config, each atomically.
    The JSON records the SHA-256 of the tensor file, so a reader knows whether the two belong
    together (a job killed between the two writes leaves a pair that does not)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DeltaError(f"{path}: a delta checkpoint must end in .safetensors")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    check_finite(tensors, f"{path}: not written")
    data = save(tensors)
    side = {"delta": config.to_dict(), **meta, "tensors_sha256": hashlib.sha256(data).hexdigest()}
    write_file_atomically(_sidecar(path), json.dumps(side, indent=1).encode())
    write_file_atomically(path, data)


def read_delta(path, allow_bin=None):
    """(tensors, DeltaConfig, meta) of a delta checkpoint, or of a peft LoRA folder (``read_peft``:
    tensors in this project's key layout). Unpickles nothing, unless ``allow_bin`` (see read_peft).
    Refuses a JSON that does not describe these tensors and tensors that are not finite."""
    path = Path(path)
    if path.is_dir():
        if not (path / PEFT_CONFIG).is_file():
            raise DeltaError(f"{path}: a folder, but neither a delta checkpoint nor a peft adapter folder "
                             f"(no {PEFT_CONFIG})")
        return read_peft(path, allow_bin)
    if not path.is_file():
        raise DeltaError(f"{path}: no such delta checkpoint")
    side = _sidecar(path)
    if not side.is_file():
        raise DeltaError(f"{path}: its config {side.name} is missing")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        delta = meta.pop("delta")
        if not isinstance(delta, dict):
            raise TypeError(f'"delta" is a {type(delta).__name__}, not an object')
        config = DeltaConfig.from_dict(delta)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DeltaError(f"{side}: not a delta config ({e})") from None
    data = path.read_bytes()
    want = meta.pop("tensors_sha256", None)  # absent in files written before it was recorded
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise DeltaError(f"{path}: its tensors are not the ones {side.name} describes (a write was interrupted?); "
                         f"rerun the step that wrote it")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types
        raise DeltaError(f"{path}: not a readable safetensors file ({e})") from None
    check_finite(tensors, path)
    return tensors, config, meta


def check_compatible(expected: DeltaConfig, found: DeltaConfig, where, against="the model's"):
    if expected.fields() != found.fields():
        raise DeltaError(f"{where}: delta config {found.fields()} does not match {against} {expected.fields()}")


def load_delta_state(model, tensors: dict, where="delta"):
    """Copy delta tensors into the model's delta parameters; every key and shape must match."""
    own = dict(delta_named_parameters(model))
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise DeltaError(f"{where}: keys do not match the model's delta "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    for k, p in own.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise DeltaError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, the model expects {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k].to(p.dtype))


def load_delta(model, path):
    """Load a delta checkpoint into a model that carries the same delta config; returns its meta."""
    tensors, config, meta = read_delta(path)
    if getattr(model, "delta_config", None) is None:
        raise DeltaError(f"{path}: the model carries no delta to load into")
    check_compatible(model.delta_config, config, path)
    load_delta_state(model, tensors, where=str(path))
    return meta


# --------------------------------------------------------------------------- peft adapter folders
#
# peft saves a LoRA as adapter_config.json + adapter_model.safetensors (older versions: the pickle
# adapter_model.bin), keys ``base_model.model.{module path}.lora_A.weight`` (r, in) and
# ``.lora_B.weight`` (out, r), scale lora_alpha / r (alpha / sqrt(r) with use_rslora). Ours:
# ``{module path}.lora.A`` (r, in) / ``.lora.B`` (out, r), the same values.

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


__all__ = ["DeltaConfig", "DeltaError", "Adapter", "LoRA", "Prefix", "attach_delta", "delta_named_parameters",
           "delta_state_dict", "count_delta_parameters", "save_delta", "read_delta", "load_delta",
           "load_delta_state", "check_compatible", "prefix_attention", "write_file_atomically", "METHODS", "ATTACH",
           "LORA_TARGETS", "read_peft", "write_peft", "is_peft_folder", "peft_weights_path", "peft_config_of",
           "PEFT_BIN_ENV", "PICKLE_REASON"]

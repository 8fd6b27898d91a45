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
        from delta_peft import PEFT_CONFIG, read_peft  # imported here: delta_peft builds on this module

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


__all__ = ["DeltaConfig", "DeltaError", "Adapter", "LoRA", "Prefix", "attach_delta", "delta_named_parameters",
           "delta_state_dict", "count_delta_parameters", "save_delta", "read_delta", "load_delta",
           "load_delta_state", "check_compatible", "prefix_attention", "write_file_atomically", "METHODS", "ATTACH",
           "LORA_TARGETS"]

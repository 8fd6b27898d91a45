"""Loading the frozen backbone and its tokenizer; device and precision choice."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from pathlib import Path

import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration
from huggingface_hub.utils import logging as hub_logging
from transformers.utils import logging as hf_logging

from pewe.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "data" / "t5-mini"  # the embedded default backbone and tokenizer


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; ``cuda`` / ``cuda:N`` must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available here (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
    elif dev.type != "cpu":
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return dev


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on a GPU that supports it or a CPU with native bf16, else fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision must be auto, fp32 or bf16, not {precision!r} (fp16 is not offered: T5 "
                        f"overflows in it)")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _looks_like_a_path(name) -> bool:
    """A hub id is ``namespace/name``; anything else, or a name whose first part is a local folder
    (``data/t5-mni``), is meant as a folder."""
    text = str(name)
    return (text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") != 1
            or Path(text).exists() or Path(text).parent.is_dir())


def load_backbone(model_path, tokenizer_path=None, device="cpu"):
    """A stock ``T5ForConditionalGeneration`` (hub name or local folder) and its tokenizer."""
    tokenizer_path = tokenizer_path or model_path
    for p in (model_path, tokenizer_path):
        if _looks_like_a_path(p) and not Path(p).expanduser().is_dir():
            raise UserError(f"{p}: no such model folder (a hub name is namespace/name; build the embedded "
                            f"backbone with `make backbone`)")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()  # no retry lines on the terminal when the hub cannot be reached
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(Path(tokenizer_path).expanduser()))
            # float32 parameters whatever the file stores; speed comes from autocast (--precision)
            model = T5ForConditionalGeneration.from_pretrained(str(Path(model_path).expanduser()), dtype=torch.float32)
        except OSError as e:  # offline, unknown repository, missing file: transformers' message is long
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{model_path}: cannot load this model (not a local folder, and the Hugging Face hub "
                            f"gave: {first})") from None
    if model.config.model_type not in ("t5", "mt5", "umt5"):
        raise UserError(f"{model_path}: a {model.config.model_type} model, not a T5-family model")
    model.to(device)
    logging.getLogger(__name__).debug("loaded %s (%d parameters)", model_path, model.num_parameters())
    return model, tokenizer


def model_fingerprint(model) -> str:
    """SHA-256 of the backbone's own parameters (names, shapes, values; delta parameters left out),
    computed once per model: what a run records as "the model", whatever path it was loaded from."""
    cached = getattr(model, "_pewe_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        if any(k in name for k in (".adapter.", ".lora.", ".prefix.")) or name.startswith("prefix"):
            continue
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(p.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    model._pewe_fingerprint = h.hexdigest()
    return model._pewe_fingerprint


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's whole definition (vocabulary, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        text = repr(sorted(tokenizer.get_vocab().items()))
    else:  # truncation and padding are left on the backend by the last call, not part of the tokenizer
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()

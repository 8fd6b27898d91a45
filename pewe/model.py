"""Loading the frozen backbone and its tokenizer; device and precision choice."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration
from transformers.utils import logging as hf_logging

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "data" / "t5-mini"  # the embedded default backbone and tokenizer


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_backbone(model_path, tokenizer_path=None, device="cpu"):
    """A stock ``T5ForConditionalGeneration`` (hub name or local folder) and its tokenizer."""
    tokenizer_path = tokenizer_path or model_path
    for p in (model_path, tokenizer_path):
        if str(p).startswith(("/", ".")) and not Path(p).exists():
            raise FileNotFoundError(f"{p}: no such model folder (build the embedded one with `make backbone`)")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
        # float32 parameters whatever the file stores; speed comes from autocast (--precision)
        model = T5ForConditionalGeneration.from_pretrained(str(model_path), dtype=torch.float32)
    if model.config.model_type not in ("t5", "mt5", "umt5"):
        raise ValueError(f"{model_path}: a {model.config.model_type} model, not a T5-family model")
    model.to(device)
    logging.getLogger(__name__).debug("loaded %s (%d parameters)", model_path, model.num_parameters())
    return model, tokenizer

"""What every entry script does around its work: logging, device, backbone, and clean failures.

Known bad input (data, delta, missing file) ends with one ``error: ...`` line naming the file and a
nonzero exit status instead of a traceback.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

# Tokenizers' own threads next to torch's would oversubscribe the cores (and warn after a fork).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pewe.errors import USER_ERRORS  # noqa: E402
from pewe.model import load_backbone, pick_device, resolve_precision  # noqa: E402


def setup_logging(output_dir, log_name, quiet=False):
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("pewe")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s - %(levelname)s - %(message)s", "%m/%d/%Y %H:%M:%S")
    fh = logging.FileHandler(Path(output_dir) / log_name)
    fh.setFormatter(fmt)
    logger.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    sh.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.addHandler(sh)
    return logger


def run_entry(a, log_name, fn, needs_model=True):
    """Set up, load the backbone, call ``fn(a, model, tokenizer, device, precision)``; exit status."""
    if not a.output_dir:
        print("error: --output_dir is required", file=sys.stderr)
        return 2
    logger = setup_logging(a.output_dir, log_name, getattr(a, "quiet", False))
    logger.info("options: %s", vars(a))
    warnings.filterwarnings("ignore", message=".*generation flags.*")

    def work():
        device = pick_device(getattr(a, "device", "auto"))
        precision = resolve_precision(getattr(a, "precision", "auto"), device)
        logger.info("device %s, precision %s", device, precision)
        model, tokenizer = load_backbone(a.model, a.tokenizer_path, device) if needs_model else (None, None)
        fn(a, model, tokenizer, device, precision)

    return run_cli(work, logger=logger)


def run_cli(fn, *args, logger=None) -> int:
    """Call ``fn(*args)``; known bad input ends with one ``error: ...`` line (and a line in the log
    file of ``logger``, if given) and exit status 1; Ctrl-C with 130."""
    try:
        fn(*args)
    except USER_ERRORS as e:
        for h in logger.handlers if logger else ():  # the log file gets it; the terminal one plain line
            if isinstance(h, logging.FileHandler):
                h.emit(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (e,), None))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command (finished work is kept)", file=sys.stderr)
        return 130
    return 0

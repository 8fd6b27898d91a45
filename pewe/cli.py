"""What every entry script does around its work: logging, device, backbone, and clean failures.

Known bad input (data, delta, missing file) ends with one ``error: ...`` line naming the file and a
nonzero exit status instead of a traceback.
"""
from __future__ import annotations

import errno
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


def run_entry(a, log_name, fn, needs_model=True, check=None):
    """Set up, load the backbone, call ``fn(a, model, tokenizer, device, precision)``; exit status.
    ``check(a)``, if given, refuses bad options before the backbone is loaded or anything is written."""
    if not a.output_dir:
        print("error: --output_dir is required", file=sys.stderr)
        return 2
    logger = None

    def work():
        nonlocal logger
        device = pick_device(getattr(a, "device", "auto"))
        precision = resolve_precision(getattr(a, "precision", "auto"), device)
        if check is not None:
            check(a)
        logger = setup_logging(a.output_dir, log_name, getattr(a, "quiet", False))
        logger.info("options: %s", vars(a))
        logger.info("device %s, precision %s", device, precision)
        warnings.filterwarnings("ignore", message=".*generation flags.*")
        model, tokenizer = load_backbone(a.model, a.tokenizer_path, device) if needs_model else (None, None)
        fn(a, model, tokenizer, device, precision)

    return run_cli(work, logger=lambda: logger)


def error_text(e: BaseException) -> str:
    """One line for the user: our errors carry their own message; an OS error names its path."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}" + (" (partial files were removed)" if e.errno == errno.ENOSPC else "")
    return str(e)


def run_cli(fn, *args, logger=None) -> int:
    """Call ``fn(*args)``; known bad input, and a file that cannot be read or written (a read-only
    folder, a full disk), end with one ``error: ...`` line (and a line in the log file of ``logger``,
    if given: a logger or a function giving one) and exit status 1; Ctrl-C with 130."""
    logging.raiseExceptions = False  # a log file on a full disk must not print a traceback per line
    try:
        fn(*args)
    except (*USER_ERRORS, OSError) as e:
        log_to = logger() if callable(logger) else logger
        for h in log_to.handlers if log_to else ():  # the log file gets it; the terminal one plain line
            if isinstance(h, logging.FileHandler):
                h.emit(log_to.makeRecord(log_to.name, logging.ERROR, __file__, 0, "%s", (error_text(e),), None))
        print(f"error: {error_text(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command (finished work is kept)", file=sys.stderr)
        return 130
    return 0

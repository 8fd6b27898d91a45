"""Atomic file writes: a temporary file in the same folder, flushed, then renamed over the target.

A reader (or a resumed run after SIGKILL) sees either the old file or the new one, never half of one.
The primitive lives in ``delta_modules`` (which stands alone, without this package).
"""
from __future__ import annotations

from delta_modules import write_file_atomically as atomic_write_bytes


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


__all__ = ["atomic_write_bytes", "atomic_write_text"]

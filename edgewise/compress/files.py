"""Writing an output model: never the input (and never a half-written file: the writes go
through :func:`edgewise.files.write_atomic`)."""

from __future__ import annotations

import os
from pathlib import Path


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (same path once resolved, or hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False

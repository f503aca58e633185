"""Writing an output model: never a half-written file, never the input."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from edge_node.updates.files import fsync_dir


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (same path once resolved, or hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, rename it over ``path`` and fsync
    the directory. On any failure the temp file is removed and ``path`` is as it was."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)

"""The update state's file operations besides the durable writes (:mod:`edgewise.files`)."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()

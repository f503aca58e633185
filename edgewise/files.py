"""Durable file writes: a file is either its old content or its new content, never half of
one, and once a call returns the new content survives a power cut.

How: write a temp file in the target's directory, fsync it, rename it over the target, fsync the
directory (the rename lives in the directory). On any failure before the rename the temp file is
removed and the target is untouched. A crash (kill -9, power) can leave a hidden
``.NAME.*.tmp`` beside the target, never a damaged target. Standard library only: every layer
may use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make the directory ``path``'s entries (a rename, a new or removed file) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(path: Path, mode: int) -> tuple[int, Path]:
    """A new, empty, exclusively created temp file beside ``path``: its fd and path."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits taken: draw again
            continue


@contextlib.contextmanager
def atomic_file(path: Path, *, mode: int = 0o666) -> Iterator[BinaryIO]:
    """Write ``path`` through the yielded file: when the block ends without an error, the file
    is fsynced, renamed over ``path`` and the directory fsynced; when it raises, ``path`` is
    as it was and the temp file is gone. ``mode`` is that of a new file (the umask applies)."""
    fd, tmp = _create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: Path, *, mode: int = 0o666) -> Iterator[Path]:
    """Like :func:`atomic_file` for writers that open a path themselves (a Parquet or CSV
    writer): the yielded temp path is fsynced and renamed over ``path`` when the block ends."""
    fd, tmp = _create_temp(path, mode)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o666) -> None:
    """Replace ``path``'s content with ``data``, durably (see :func:`atomic_file`)."""
    with atomic_file(path, mode=mode) as f:
        f.write(data)


def create_durably(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Create ``path`` holding ``data`` (a private key: ``mode`` 0600 by default), durably and
    whole; never replace an existing file (:class:`FileExistsError`). The temp file is linked
    to ``path`` (which fails if it exists) instead of renamed over it."""
    fd, tmp = _create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)


def replace_durably(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst`` (same file system) and make the rename durable: both
    directories are fsynced (one when they are the same)."""
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent.resolve() != dst.parent.resolve():
        fsync_dir(src.parent)

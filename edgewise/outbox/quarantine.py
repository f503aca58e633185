"""A corrupt outbox file is moved aside, never deleted, and a fresh one takes its place.

Open a file that is corrupt or not a database (:class:`edgewise.outbox.errors.Unusable`) and
it is renamed with its ``-wal`` and ``-shm`` to ``<name>.corrupt-<UTC timestamp>`` (kept for a
post-mortem), and a fresh database is created at the path.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from edgewise.files import fsync_dir
from edgewise.outbox.config import OutboxConfig
from edgewise.outbox.errors import OutboxCorrupt, Unusable
from edgewise.outbox.schema import connect

log = logging.getLogger(__name__)


def connect_or_quarantine(config: OutboxConfig) -> tuple[sqlite3.Connection, Path | None]:
    """Connect to the outbox at ``config.path``; if it is unusable, move it aside and connect
    to a fresh one. Returns the connection and where the unusable file went (None if none)."""
    path = config.path
    recovered: Path | None = None
    try:
        conn = connect(path, config)
    except Unusable as exc:
        log.error("outbox %s is unusable (%s): moving it aside", path, exc)
        recovered = move_aside(path)
        try:
            conn = connect(path, config)
        except Unusable as again:
            raise OutboxCorrupt(f"fresh outbox at {path} is unusable: {again}") from again
    return conn, recovered


def move_aside(path: Path) -> Path:
    """Rename the db (and its -wal, -shm) to ``<name>.corrupt-<UTC timestamp>[-n]``.

    The WAL and shared-memory files go first: a stale WAL left next to a fresh database would
    be replayed into it. The moved set keeps SQLite's naming (``X-wal`` next to ``X``), so the
    moved database can be opened with its WAL for a post-mortem.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 0
    while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        moved = False
        for suffix in ("-wal", "-shm", ""):
            source = Path(f"{path}{suffix}")
            if source.exists():
                os.replace(source, Path(f"{target}{suffix}"))
                moved = True
        if moved:  # the renames survive a power cut before the fresh file is written
            fsync_dir(path.parent)
    except OSError as exc:
        raise OutboxCorrupt(f"{path} is corrupt and could not be moved aside: {exc}") from exc
    log.error("outbox %s was corrupt: moved aside to %s", path, target)
    return target

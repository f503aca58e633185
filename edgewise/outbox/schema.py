"""The outbox's file: its schema, its pragmas, and the checks made before it is opened.

Layout (the measurements behind the sizes are in :mod:`edgewise.outbox.sizing`):

* ``records`` (``id INTEGER PRIMARY KEY AUTOINCREMENT``: ids are never reused) with an index on
  ``(kind, id)`` so that "oldest record of kind K" is one index seek, not a scan. Small columns
  come before ``topic`` and ``payload`` so reading ``size`` never walks an overflow chain.
* ``answered`` (frame key → result id), written in the same transaction as the results, pruned
  to the newest ``answered_keep`` keys with one range delete per transaction, and never more
  than 1/8 of the byte budget (:mod:`edgewise.outbox.answered`).
* ``counters`` (per kind: appended, deleted, evicted) updated in every write transaction, so
  ``appended - deleted - evicted == stored`` per kind, across restarts
  (:mod:`edgewise.outbox.counters`).

Pragmas: WAL journal with SQLite's automatic checkpoint off (checkpoints are the journal's:
:mod:`edgewise.outbox.journal`), ``auto_vacuum=INCREMENTAL`` set at creation, and
``secure_delete = FAST``. A file that is corrupt or not a database raises
:class:`edgewise.outbox.errors.Unusable` here; :mod:`edgewise.outbox.quarantine` moves it aside.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from edgewise.outbox.config import OutboxConfig
from edgewise.outbox.errors import OutboxError, Unusable, is_unusable, translate
from edgewise.outbox.sizing import PAGE_SIZE

_APPLICATION_ID = 0x45445742  # "EDWB": marks a file as an edgewise outbox
_SCHEMA_VERSION = 2
#: Schema 1 lacked the ``items`` columns; it is upgraded in place when opened.
_UPGRADABLE = {1}
_BUSY_TIMEOUT_MS = 5000
#: Ids per "IN (…)" chunk: well under SQLITE_MAX_VARIABLE_NUMBER.
MAX_VARIABLES = 500

_SCHEMA = (
    """CREATE TABLE records(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        size INTEGER NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        created_at REAL NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        items INTEGER NOT NULL DEFAULT 1)""",
    "CREATE INDEX records_by_kind ON records(kind, id)",
    """CREATE TABLE answered(
        n INTEGER PRIMARY KEY,
        frame_key TEXT NOT NULL UNIQUE,
        result_id TEXT NOT NULL,
        size INTEGER NOT NULL)""",
    """CREATE TABLE counters(
        kind TEXT PRIMARY KEY,
        appended INTEGER NOT NULL DEFAULT 0,
        deleted INTEGER NOT NULL DEFAULT 0,
        evicted INTEGER NOT NULL DEFAULT 0,
        evicted_items INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID""",
)


def connect(path: Path, config: OutboxConfig) -> sqlite3.Connection:
    """Check, open and (if new) initialise the database. Raises :class:`Unusable` if corrupt."""
    fresh = not path.exists() or _inspect(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise translate(exc, f"opening {path}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if fresh:
            _create_schema(conn)
        elif conn.execute("PRAGMA user_version").fetchone()[0] in _UPGRADABLE:
            _upgrade_schema(conn)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxError(f"{path}: could not switch to WAL (journal_mode is {mode})")
        conn.execute(f"PRAGMA synchronous = {config.synchronous}")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints are ours: see module doc
        # Debian's SQLite is built with SECURE_DELETE: every freed page would be zeroed, i.e.
        # written to the WAL, so deleting 1 MiB of records wrote 1 MiB of WAL. FAST zeroes
        # deleted content only in pages written anyway (ADR 0075).
        conn.execute("PRAGMA secure_delete = FAST")
        for kind in config.eviction_order:
            conn.execute("INSERT OR IGNORE INTO counters(kind) VALUES (?)", (kind,))
    except sqlite3.Error as exc:
        conn.close()
        if is_unusable(exc):
            raise Unusable(str(exc)) from exc
        raise translate(exc, f"opening {path}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _inspect(path: Path) -> bool:
    """Check an existing file READ-ONLY; True if it is an empty database to initialise.

    Read-only, because a read-write connection to a damaged database would, on close,
    checkpoint its WAL into it and delete the WAL: the evidence we keep when moving it aside.
    Raises :class:`Unusable` (corrupt, not a database) or :class:`OutboxError` (another
    application's database, a newer schema: not ours to move).
    """
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise translate(exc, f"opening {path}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        check = [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
        if check != ["ok"]:
            raise Unusable("; ".join(check[:5]))
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
    except sqlite3.Error as exc:
        if is_unusable(exc):
            raise Unusable(str(exc)) from exc
        raise translate(exc, f"checking {path}") from exc
    finally:
        conn.close()
    if tables == 0 and app_id == 0:
        return True
    if app_id != _APPLICATION_ID:
        raise OutboxError(f"{path} is a SQLite database of another application: not touched")
    if version != _SCHEMA_VERSION and version not in _UPGRADABLE:
        raise OutboxError(f"{path} has outbox schema {version}; this code knows {_SCHEMA_VERSION}")
    return False


def _upgrade_schema(conn: sqlite3.Connection) -> None:
    """Schema 1 → 2: the ``items`` a record carries and the evicted items per kind."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("ALTER TABLE records ADD COLUMN items INTEGER NOT NULL DEFAULT 1")
        conn.execute("ALTER TABLE counters ADD COLUMN evicted_items INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE counters SET evicted_items = evicted")
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect before the first table
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise

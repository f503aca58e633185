"""Exceptions raised by :mod:`edgewise.outbox`.

sqlite3's exceptions (and the ``OSError`` of file operations) are translated here, at one
boundary; callers never see a sqlite3 type. Invalid arguments (an unknown kind, a negative limit)
raise ``ValueError`` before anything is written.

Tree::

    OutboxError            anything else that went wrong in SQLite or the file system
    ├── StorageFull        the disk is full (SQLITE_FULL, "database or disk is full", ENOSPC):
    │                      the transaction was rolled back, nothing is half-written, and the
    │                      outbox works again once space is freed
    └── OutboxCorrupt      the database was corrupt or unreadable AND could not be moved aside
                           (a corrupt file that could be moved aside is not an error: see
                           ``Outbox.recovered_from``)
"""

from __future__ import annotations

import errno
import sqlite3

_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26


class OutboxError(Exception):
    """Base class of every error raised by outbox."""


class StorageFull(OutboxError):
    """The disk (or the database's page limit) is full; the operation was rolled back."""


class OutboxCorrupt(OutboxError):
    """The database is corrupt or unreadable and moving it aside failed."""


class Unusable(Exception):
    """The file is corrupt or not a database: move it aside (never leaves the package: the
    opening path catches it and quarantines the file, :mod:`edgewise.outbox.quarantine`)."""


def translate(exc: BaseException, what: str) -> OutboxError:
    """The one boundary where sqlite3 and OS errors become :class:`OutboxError`."""
    if isinstance(exc, OutboxError):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        name = getattr(exc, "sqlite_errorname", type(exc).__name__)
        if (code is not None and code & 0xFF == _SQLITE_FULL) or "disk is full" in str(exc):
            return StorageFull(f"{what}: {name}: {exc}")
        return OutboxError(f"{what}: {name}: {exc}")
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return StorageFull(f"{what}: {exc}")
        return OutboxError(f"{what}: {exc}")
    return OutboxError(f"{what}: {exc!r}")


def is_unusable(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)

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


class OutboxError(Exception):
    """Base class of every error raised by outbox."""


class StorageFull(OutboxError):
    """The disk (or the database's page limit) is full; the operation was rolled back."""


class OutboxCorrupt(OutboxError):
    """The database is corrupt or unreadable and moving it aside failed."""

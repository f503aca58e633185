"""Exceptions raised by :mod:`cloud_worker`.

Tree::

    WorkerError
    ├── ConfigError     a setting is missing or invalid (the message names the key and source)
    ├── StoreError      the hard-example store cannot be opened, written or read (translated from
    │                   sqlite3 errors at one boundary, :mod:`cloud_worker.store`)
    ├── ExportError     an export cannot be written (e.g. pyarrow missing for Parquet)
    └── HandlerError    a handler is missing for a model, or returned the wrong number of verdicts
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of every error raised by cloud_worker."""


class ConfigError(WorkerError):
    """A setting is missing or invalid."""


class StoreError(WorkerError):
    """The hard-example store failed."""


class ExportError(WorkerError):
    """An export could not be written."""


class HandlerError(WorkerError):
    """A handler is missing or misbehaved."""

"""A hard example as the store keeps it: the table's columns, the row of one answered case,
and the rows read back (oldest first, read-only) for export."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import sqlite_utils

from cloud_worker.errors import StoreError
from schemas import Escalation

TABLE = "examples"
COLUMNS: dict[str, Any] = {
    "id": str,
    "node": str,
    "model": str,
    "edge_release": int,
    "device": str,
    "sensor": str,
    "frame_seq": int,
    "sent_at": float,
    "received_at": float,
    "offline": int,
    "dtype": str,
    "shape": str,
    "input": bytes,
    "edge_label": int,
    "edge_confidence": float,
    "edge_margin": float,
    "edge_entropy": float,
    "cloud_label": int,
    "cloud_confidence": float,
    "cloud_model": str,
    "worker": str,
    "answered_at": float,
}


class Answer(msgspec.Struct, frozen=True, gc=False):
    """What a worker answered for one escalation id (a struct: one is made per case, and a
    frozen dataclass takes ~7 x as long to build)."""

    label: int
    confidence: float
    model: str
    worker: str


Row = tuple[Any, ...]
"""One hard example: its values in :data:`COLUMNS` order."""


EPOCH_FLOOR = 1e9
"""Stores written before received_at was epoch seconds hold the receiving process's monotonic
clock there: always below this (2001-09-09), and read back as unknown (``None``)."""


def epoch_of(monotonic_s: float, now: float, mono_now: float) -> float:
    """Epoch seconds of ``monotonic_s``, a :func:`time.monotonic` reading taken recently, given
    ``now`` and ``mono_now`` read together."""
    return now - (mono_now - monotonic_s)


def example_row(
    esc: Escalation,
    answer: Answer,
    *,
    received_at: float,
    answered_at: float,
    shape_text: str | None = None,
) -> Row:
    """The row of one answered case (``shape_text``: ``esc.shape`` as JSON, if known)."""
    edge = esc.edge
    return (
        esc.id,
        esc.node,
        esc.model,
        esc.release,
        esc.device,
        esc.sensor,
        esc.frame_seq,
        esc.ts,
        received_at,
        int(esc.offline),
        esc.dtype,
        json.dumps(esc.shape) if shape_text is None else shape_text,
        esc.data,
        edge.label,
        edge.confidence,
        edge.margin,
        edge.entropy,
        answer.label,
        answer.confidence,
        answer.model,
        answer.worker,
        answered_at,
    )


def row_of(values: dict[str, Any]) -> Row:
    """A row from a mapping of every column (a KeyError names a missing one)."""
    return tuple(values[c] for c in COLUMNS)


def iter_rows(path: Path, batch: int = 1000) -> tuple[int, Iterator[list[dict[str, Any]]]]:
    """(row count, iterator of row batches oldest first) of the store at ``path``, read-only."""
    if not path.is_file():
        raise StoreError(f"no hard-example store at {path} (see store.path in the worker config)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db = sqlite_utils.Database(conn)
        if TABLE not in db.table_names():
            raise StoreError(f"{path} holds no {TABLE!r} table: not a hard-example store")
        total = db[TABLE].count
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc

    def batches() -> Iterator[list[dict[str, Any]]]:
        try:
            offset = 0
            while True:
                rows = list(
                    db.query(
                        f"SELECT * FROM {TABLE} ORDER BY answered_at, id LIMIT ? OFFSET ?",
                        [batch, offset],
                    )
                )
                if not rows:
                    return
                offset += len(rows)
                for row in rows:  # an old store's monotonic reading means nothing outside it
                    r = row.get("received_at")
                    if isinstance(r, float | int) and r < EPOCH_FLOOR:
                        row["received_at"] = None
                yield rows
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        finally:
            conn.close()

    return total, batches()

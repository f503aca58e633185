"""What the outbox holds and has done, per kind: persisted counters and their in-memory mirror.

``counters`` (per kind: appended, deleted, evicted, evicted items) is updated in every write
transaction, so ``appended - deleted - evicted == stored`` per kind, across restarts. The
:class:`State` mirrors what is committed (rows, accounted bytes, counters, answered keys); a
transaction works on a copy and :func:`write_counters` writes the difference in the same
transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot of an outbox. Counters are per kind and count since the database was created.

    Per kind, ``appended - deleted - evicted == rows_by_kind`` always holds.
    """

    rows: int  # records stored
    bytes: int  # accounted bytes: records + answered keys
    file_bytes: int  # db file + WAL file on disk
    appended: dict[str, int]
    deleted: dict[str, int]  # deleted by the owner (delivered)
    evicted: dict[str, int]  # evicted to stay within the bound
    evicted_items: dict[str, int]  # what the evicted records carried (Record.items), per kind
    rows_by_kind: dict[str, int]
    budget_bytes: int  # the accounted-bytes budget derived from max_bytes
    answered_keys: int
    answered_bytes: int
    commits: int  # write transactions committed by this Outbox object since it was opened
    # Since this Outbox object was opened (not persisted):
    appended_bytes: int = 0  # accounted bytes of the records appended (evicted ones included)
    peak_file_bytes: int = 0  # largest db + WAL on disk, at a commit or during a checkpoint
    checkpoints: int = 0  # WAL checkpoints (each truncates the WAL)
    storage_full: int = 0  # transactions that found the disk full (retries included)

    @property
    def evicted_total(self) -> int:
        return sum(self.evicted.values())


@dataclass(slots=True)
class State:
    """In-memory mirror of what is committed; a transaction works on a copy."""

    rows: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    appended: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    evicted: dict[str, int] = field(default_factory=dict)
    evicted_items: dict[str, int] = field(default_factory=dict)
    answered_rows: int = 0
    answered_bytes: int = 0
    answered_max: int = 0

    def copy(self) -> State:
        return State(
            dict(self.rows),
            dict(self.bytes),
            dict(self.appended),
            dict(self.deleted),
            dict(self.evicted),
            dict(self.evicted_items),
            self.answered_rows,
            self.answered_bytes,
            self.answered_max,
        )

    def add(self, counter: dict[str, int], kind: str, n: int) -> None:
        counter[kind] = counter.get(kind, 0) + n

    @property
    def record_bytes(self) -> int:
        return sum(self.bytes.values())


def load_state(conn: sqlite3.Connection, eviction_order: Sequence[str]) -> State:
    """The state as committed, read at open."""
    state = State()
    for kind, rows, size in conn.execute(
        "SELECT kind, count(*), total(size) FROM records GROUP BY kind"
    ):
        state.rows[kind] = rows
        state.bytes[kind] = int(size)
    for kind, appended, deleted, evicted, evicted_items in conn.execute(
        "SELECT kind, appended, deleted, evicted, evicted_items FROM counters"
    ):
        state.appended[kind] = appended
        state.deleted[kind] = deleted
        state.evicted[kind] = evicted
        state.evicted_items[kind] = evicted_items
    for kind in (*eviction_order, *state.rows, *state.appended):
        for counter in (
            state.rows,
            state.bytes,
            state.appended,
            state.deleted,
            state.evicted,
            state.evicted_items,
        ):
            counter.setdefault(kind, 0)
    rows, size, top = conn.execute(
        "SELECT count(*), total(size), coalesce(max(n), 0) FROM answered"
    ).fetchone()
    state.answered_rows, state.answered_bytes, state.answered_max = rows, int(size), top
    return state


def write_counters(conn: sqlite3.Connection, old: State, state: State) -> None:
    """Add what ``state`` counted since ``old`` to the persisted counters (in the running
    transaction)."""
    rows = []
    for kind in sorted({*state.appended, *state.deleted, *state.evicted}):
        da = state.appended.get(kind, 0) - old.appended.get(kind, 0)
        dd = state.deleted.get(kind, 0) - old.deleted.get(kind, 0)
        de = state.evicted.get(kind, 0) - old.evicted.get(kind, 0)
        di = state.evicted_items.get(kind, 0) - old.evicted_items.get(kind, 0)
        if da or dd or de or di:
            rows.append((kind, da, dd, de, di))
    if rows:
        conn.executemany(
            "INSERT INTO counters(kind, appended, deleted, evicted, evicted_items) "
            "VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(kind) DO UPDATE SET appended = appended + excluded.appended, "
            "deleted = deleted + excluded.deleted, evicted = evicted + excluded.evicted, "
            "evicted_items = evicted_items + excluded.evicted_items",
            rows,
        )

"""The deduplication table: which frames were answered, written with their results.

``answered`` maps a frame key to the id of its result. Keys are inserted in the same transaction
as the results (one commit makes both durable), a key already answered keeps its first result
id, and the table is pruned to the newest ``answered_keep`` keys with one range delete per
transaction. It is a cache: it never takes more than 1/8 of the byte budget, nor more than 1/8
of what the volume can give the outbox.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from edgewise.outbox.config import OutboxConfig
from edgewise.outbox.counters import State
from edgewise.outbox.errors import translate
from edgewise.outbox.schema import MAX_VARIABLES
from edgewise.outbox.sizing import answered_cost


class AnsweredKeys:
    """The answered keys of one outbox connection; a :class:`edgewise.outbox.journal.Participant`
    (each writing transaction sets how many bytes the keys may take, from the volume's room)."""

    def __init__(self, conn: sqlite3.Connection, config: OutboxConfig, budget: int) -> None:
        self._conn = conn
        self._keep = config.answered_keep
        self._cap = budget // 8
        self._limit = self._cap  # lower while the volume is tight

    def begin(self, writes: bool, room_bytes: int | None) -> None:
        if writes:
            room = self._cap * 8 if room_bytes is None else room_bytes
            self._limit = max(0, min(self._cap, room // 8))

    def end(self, committed: bool) -> None:
        pass

    def get(self, frame_key: str) -> str | None:
        """The result id stored for ``frame_key``, if that frame was already answered."""
        try:
            row = self._conn.execute(
                "SELECT result_id FROM answered WHERE frame_key = ?", (frame_key,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise translate(exc, "reading answered keys") from exc
        return None if row is None else str(row[0])

    def get_many(self, frame_keys: Sequence[str]) -> dict[str, str]:
        """The result ids stored for those of ``frame_keys`` that were already answered."""
        found: dict[str, str] = {}
        try:
            for start in range(0, len(frame_keys), MAX_VARIABLES):
                chunk = list(frame_keys[start : start + MAX_VARIABLES])
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT frame_key, result_id FROM answered WHERE frame_key IN ({marks})",
                    chunk,
                )
                found.update((str(k), str(r)) for k, r in rows)
        except sqlite3.Error as exc:
            raise translate(exc, "reading answered keys") from exc
        return found

    def keys(self) -> list[str]:
        """Every frame key remembered, oldest first (to rebuild an index of them at start)."""
        try:
            rows = self._conn.execute("SELECT frame_key FROM answered ORDER BY n").fetchall()
        except sqlite3.Error as exc:
            raise translate(exc, "reading answered keys") from exc
        return [str(k) for (k,) in rows]

    def insert(self, state: State, answered: Sequence[tuple[str, str]]) -> None:
        """Insert ``(frame_key, result_id)`` pairs and prune (in the running transaction)."""
        conn = self._conn
        conn.executemany(
            "INSERT OR IGNORE INTO answered(frame_key, result_id, size) VALUES (?, ?, ?)",
            [(k, r, answered_cost(k, r)) for k, r in answered],
        )
        rows, size, top = conn.execute(
            "SELECT count(*), total(size), coalesce(max(n), 0) FROM answered WHERE n > ?",
            (state.answered_max,),
        ).fetchone()
        state.answered_rows += rows
        state.answered_bytes += int(size)
        state.answered_max = max(state.answered_max, top)
        # Rows are numbered contiguously and pruned from the low end only, so the newest
        # `keep` keys are exactly n > max - keep: one range delete per transaction.
        cut = state.answered_max - self._keep
        first = state.answered_max - state.answered_rows + 1
        pruned_rows, pruned_bytes = 0, 0
        if cut >= first:
            pruned_rows, pb = conn.execute(
                "SELECT count(*), total(size) FROM answered WHERE n <= ?", (cut,)
            ).fetchone()
            pruned_bytes = int(pb)
        else:
            cut = first - 1
        if state.answered_bytes - pruned_bytes > self._limit:
            over = state.answered_bytes - pruned_bytes - self._limit
            cursor = conn.execute(
                "SELECT n, size FROM answered WHERE n > ? AND n < ? ORDER BY n",
                (cut, state.answered_max),
            )
            try:
                for n, size in cursor:
                    if over <= 0:
                        break
                    over -= size
                    pruned_rows += 1
                    pruned_bytes += size
                    cut = n
            finally:
                cursor.close()
        if pruned_rows:
            conn.execute("DELETE FROM answered WHERE n <= ?", (cut,))
            state.answered_rows -= pruned_rows
            state.answered_bytes -= pruned_bytes

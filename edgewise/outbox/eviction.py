"""Eviction: when the bound is reached, records go by priority, and every eviction is counted.

Kinds no longer configured go first, then ``eviction_order``; within a kind, the oldest first;
never a record a forwarder handed to a broker and has not deleted yet (``protected``). Every
eviction is counted per kind (records and the items they carried) in the same transaction. Under
the accounted budget (:func:`edgewise.outbox.sizing.budget_for`) lies a page-level safety net
(:meth:`Evictor.enforce_pages`): live pages must fit the page limit at commit.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Sequence, Set

from edgewise.outbox.config import OutboxConfig
from edgewise.outbox.counters import State
from edgewise.outbox.record import Record
from edgewise.outbox.schema import MAX_VARIABLES
from edgewise.outbox.sizing import PAGE_SIZE, page_limit


class Evictor:
    """Evicts from one outbox connection, inside the running transaction; a
    :class:`edgewise.outbox.journal.Participant` (it counts the topics of what a transaction
    evicted, and keeps them only if it commits)."""

    def __init__(self, conn: sqlite3.Connection, config: OutboxConfig) -> None:
        self._conn = conn
        self._order = config.eviction_order
        self._kinds = frozenset(config.eviction_order)
        self._page_limit = page_limit(config.max_bytes)
        self.page_trims = 0  # times the page-level safety net had to evict (not persisted)
        # Topics of evicted records, counted when asked for (take_evicted_topics).
        self._evicted_topics: Counter[str] | None = None
        self._txn_topics: Counter[str] | None = None

    def count_evicted_topics(self) -> None:
        """From now on, count the topic of every evicted record (:meth:`take_evicted_topics`)."""
        if self._evicted_topics is None:
            self._evicted_topics = Counter()

    def take_evicted_topics(self) -> Counter[str]:
        """Evicted records per topic since the last call (committed evictions only)."""
        taken = self._evicted_topics if self._evicted_topics is not None else Counter()
        if self._evicted_topics is not None:
            self._evicted_topics = Counter()
        return taken

    def begin(self, writes: bool, room_bytes: int | None) -> None:
        if self._evicted_topics is not None:
            self._txn_topics = Counter()

    def end(self, committed: bool) -> None:
        topics, self._txn_topics = self._txn_topics, None
        if committed and topics and self._evicted_topics is not None:
            self._evicted_topics.update(topics)

    def enforce_pages(self, state: State, protected: Set[int]) -> None:
        """Safety net under the accounting: live pages must fit the page limit at commit.

        The accounting models SQLite's storage closely (see :func:`record_cost`) and the budget
        leaves a margin, so this rarely fires; when it does (an unusual mix of row sizes that
        packs pages badly), it evicts more, by the same priority, until the pages fit.
        """
        conn = self._conn
        for _ in range(16):
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            over = (pages - free) * PAGE_SIZE - self._page_limit
            if over <= 0 or state.record_bytes == 0:
                return
            self.page_trims += 1
            before = state.record_bytes
            self.evict(state, over, protected)
            if state.record_bytes == before:
                return  # only protected records are left (a forwarder's window at most)

    def _eviction_sequence(self, state: State) -> list[str]:
        """Kinds no longer configured go first, then ``eviction_order``."""
        return [k for k in state.rows if k not in self._kinds] + list(self._order)

    def evict(
        self,
        state: State,
        excess: int,
        protected: Set[int],
        records: Sequence[Record] = (),
        costs: Sequence[int] = (),
    ) -> set[int]:
        """Evict at least ``excess`` accounted bytes: oldest first within a kind, kinds in order,
        never a ``protected`` id.

        Within a kind, stored records go before the ``records`` of the batch being appended
        (they are older). Returns the indexes of batch records that must not be written.
        """
        conn = self._conn
        evicted_batch: set[int] = set()
        for kind in self._eviction_sequence(state):
            if excess <= 0:
                break
            stored = state.bytes.get(kind, 0)
            if 0 < stored <= excess and not protected:
                (items,) = conn.execute(
                    "SELECT total(items) FROM records WHERE kind = ?", (kind,)
                ).fetchone()
                self._delete_evicted("kind = ?", (kind,))
                state.add(state.evicted, kind, state.rows[kind])
                state.add(state.evicted_items, kind, int(items))
                state.rows[kind] = state.bytes[kind] = 0
                excess -= stored
            elif stored > 0:
                freed, count, items, cut = 0, 0, 0, 0
                victims: list[int] = []  # only when some ids are protected
                cursor = conn.execute(
                    "SELECT id, size, items FROM records WHERE kind = ? ORDER BY id", (kind,)
                )
                try:
                    while freed < excess:
                        chunk = cursor.fetchmany(256)
                        if not chunk:  # every record left of this kind is protected
                            break
                        for rid, size, n in chunk:
                            if rid in protected:
                                continue
                            freed += size
                            count += 1
                            items += n
                            cut = rid
                            if protected:
                                victims.append(rid)
                            if freed >= excess:
                                break
                finally:
                    cursor.close()
                if not protected:
                    self._delete_evicted("kind = ? AND id <= ?", (kind, cut))
                for start in range(0, len(victims), MAX_VARIABLES):
                    chunk_ids = victims[start : start + MAX_VARIABLES]
                    marks = ",".join("?" * len(chunk_ids))
                    self._delete_evicted(f"id IN ({marks})", chunk_ids)
                state.add(state.evicted, kind, count)
                state.add(state.evicted_items, kind, items)
                state.add(state.rows, kind, -count)
                state.add(state.bytes, kind, -freed)
                excess -= freed
            for i, record in enumerate(records):
                if excess <= 0:
                    break
                if record.kind == kind:
                    evicted_batch.add(i)
                    if self._txn_topics is not None:
                        self._txn_topics[record.topic] += 1
                    state.add(state.evicted, kind, 1)
                    state.add(state.evicted_items, kind, record.items)
                    excess -= costs[i]
        return evicted_batch

    def _delete_evicted(self, where: str, params: Sequence[object]) -> None:
        """Delete evicted rows; count their topics if asked to."""
        if self._txn_topics is None:
            self._conn.execute(f"DELETE FROM records WHERE {where}", params)
            return
        topics = self._conn.execute(f"DELETE FROM records WHERE {where} RETURNING topic", params)
        self._txn_topics.update(topic for (topic,) in topics)

"""The durable, bounded SQLite queue every edgewise service publishes through.

A record leaves the outbox only when its owner deletes it (after the broker's PUBACK); it
survives ``kill -9`` and reboots; the file has a byte bound, and when the bound is reached the
outbox evicts by priority and counts every eviction, per kind, in the database itself.

Why the standard library's ``sqlite3`` and not an ORM or a ready-made queue (persist-queue,
litequeue, diskcache …): what this needs is exactly what they do not do — a byte bound on the
file with eviction by *priority* (oldest first within a kind), eviction counters that commit in
the same transaction as the records, group commit of many callers' records in one transaction
(SD-card wear), a deduplication table written in that same transaction, and control over WAL
checkpoints and incremental vacuum so the bound holds on disk. Each of those is a few lines of
SQL; wrapping a generic queue would need all of them around it anyway.

This module is the queue (append, read, delete); each other promise has its module:

* :mod:`edgewise.outbox.sizing`: what a record costs, the budget and allowances from the bound;
* :mod:`edgewise.outbox.schema`: the file's tables, pragmas and checks at open;
* :mod:`edgewise.outbox.quarantine`: a corrupt file is moved aside, never deleted;
* :mod:`edgewise.outbox.errors`: where sqlite3 and OS errors become outbox errors;
* :mod:`edgewise.outbox.journal`: one transaction per write, the WAL within its allowance,
  checkpoints, vacuum, a full volume;
* :mod:`edgewise.outbox.eviction`: eviction by priority, counted;
* :mod:`edgewise.outbox.answered`: the deduplication table;
* :mod:`edgewise.outbox.counters`: the per-kind counters and their in-memory mirror.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence, Set
from pathlib import Path
from types import TracebackType
from typing import Self

from edgewise.outbox.answered import AnsweredKeys
from edgewise.outbox.config import OutboxConfig
from edgewise.outbox.counters import OutboxStats, State, load_state
from edgewise.outbox.errors import OutboxError, translate
from edgewise.outbox.eviction import Evictor
from edgewise.outbox.journal import Journal
from edgewise.outbox.quarantine import connect_or_quarantine
from edgewise.outbox.record import Record, Stored
from edgewise.outbox.schema import MAX_VARIABLES
from edgewise.outbox.sizing import (
    ROW_OVERHEAD,
    answered_cost,
    budget_for,
    record_cost,
    txn_bytes,
)

__all__ = [
    "ROW_OVERHEAD",
    "Outbox",
    "OutboxStats",
    "answered_cost",
    "budget_for",
    "record_cost",
    "txn_bytes",
]

log = logging.getLogger(__name__)


class Outbox:
    """A durable, byte-bounded queue of :class:`Record` in one SQLite file.

    Synchronous and NOT thread-safe: one thread at a time uses one Outbox, and one Outbox (one
    process) owns a file. :class:`edgewise.outbox.AsyncOutbox` runs one on a dedicated thread.
    """

    def __init__(
        self, conn: sqlite3.Connection, config: OutboxConfig, recovered_from: Path | None
    ) -> None:
        self._conn = conn
        self._config = config
        self._db_path = str(config.path)
        self.recovered_from: Path | None = recovered_from
        self._kinds = frozenset(config.eviction_order)
        self._budget = budget_for(config.max_bytes)
        self._protected: Callable[[], Set[int]] | None = None
        self._appended_bytes = 0
        self._closed = False
        self._answered = AnsweredKeys(conn, config, self._budget)
        self._evictor = Evictor(conn, config)
        self._journal = Journal(
            conn, config, load_state(conn, config.eviction_order), (self._answered, self._evictor)
        )

    @property
    def page_trims(self) -> int:
        """Times the page-level safety net had to evict (not persisted)."""
        return self._evictor.page_trims

    @property
    def txn_bytes_now(self) -> int:
        """Bytes one transaction should take now: :func:`txn_bytes` of the bound, or less on a
        volume with little free (a quarter of what is free beyond the reserve)."""
        return self._journal.txn_bytes_now

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, config: OutboxConfig) -> Outbox:
        """Open (or create) the outbox at ``config.path``.

        A corrupt or unreadable file is moved aside with its ``-wal`` and ``-shm`` to
        ``<name>.corrupt-<UTC timestamp>`` (kept, never deleted), a fresh database is created,
        and :attr:`recovered_from` names the moved file. Raises :class:`OutboxCorrupt` if the
        move fails, :class:`StorageFull` if the disk is full, :class:`OutboxError` otherwise
        (e.g. the file is another application's SQLite database).
        """
        path = config.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise translate(exc, f"creating {path.parent}") from exc
        conn, recovered = connect_or_quarantine(config)
        try:
            outbox = cls(conn, config, recovered)
            if outbox._over_budget():
                outbox.append(())  # the bound shrank since last time: evict down to it now
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error | OSError):
                raise translate(exc, f"opening {path}") from exc
            raise
        return outbox

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the API -----------------------------------------------------------------------------

    @property
    def config(self) -> OutboxConfig:
        return self._config

    def protect(self, unsettled: Callable[[], Set[int]] | None) -> None:
        """Ids eviction must skip: records a forwarder handed to a broker and has not deleted
        yet (in flight, acknowledged, or in doubt after a lost connection). Such a record may
        have arrived, so evicting it would count as missing what is not (ADR 0063).

        ``unsettled`` is called on this outbox's thread at each eviction and must return a
        snapshot (e.g. ``frozenset`` of a set). What it protects is bounded by the forwarder's
        window; when only protected records are left, the batch being appended gives way.
        """
        self._protected = unsettled

    def count_evicted_topics(self) -> None:
        """From now on, count the topic of every evicted record (see :meth:`take_evicted_topics`):
        a bridge tells per rule what it evicted. Costs reading the topics of evicted rows."""
        self._evictor.count_evicted_topics()

    def take_evicted_topics(self) -> Counter[str]:
        """Evicted records per topic since the last call (committed evictions only)."""
        return self._evictor.take_evicted_topics()

    def append(
        self, records: Sequence[Record], answered: Sequence[tuple[str, str]] = ()
    ) -> list[int]:
        """Store ``records`` and the ``(frame_key, result_id)`` pairs in ONE transaction.

        Returns one id per record, in order. When the total would exceed the budget, records are
        evicted oldest first within a kind, kinds in ``eviction_order``; the batch competes on
        equal terms (it is the newest of its kinds), so a batch bigger than the bound loses its
        own lowest-priority, oldest records too. Such a record still gets its id (ids stay
        aligned with ``records``) but never appears in :meth:`pending`; every eviction is
        counted. A frame key already answered keeps its first result id.
        Never raises for "outbox full"; raises :class:`StorageFull` for "disk full" (nothing
        written) and ``ValueError`` for a kind not in ``eviction_order``.
        """
        self._check_open()
        for record in records:
            if record.kind not in self._kinds:
                raise ValueError(
                    f"record kind {record.kind!r} is not in eviction_order "
                    f"{self._config.eviction_order}"
                )
        if not records and not answered and not self._over_budget():
            return []
        now = time.time()
        costs = [record_cost(r.topic, len(r.payload)) for r in records]
        size = sum(costs)
        ids = self._journal.transaction(
            "append",
            lambda st: self._append(st, records, costs, answered, now),
            size + sum(answered_cost(k, r) for k, r in answered),
        )
        self._appended_bytes += size
        return ids

    def pending(
        self,
        limit: int,
        after_id: int = 0,
        *,
        kinds: Set[str] | None = None,
        exclude: Set[str] | None = None,
    ) -> list[Stored]:
        """Up to ``limit`` stored records with ``id > after_id``, in ascending id order; only
        of ``kinds`` if given, none of ``exclude`` (two forwarders can share one outbox)."""
        self._check_open()
        if limit < 0:
            raise ValueError("limit must be >= 0")
        where = "id > ?"
        params: list[object] = [after_id]
        for names, op in ((kinds, "IN"), (exclude, "NOT IN")):
            if names is not None:
                where += f" AND kind {op} ({', '.join('?' * len(names))})"
                params += sorted(names)
        try:
            rows = self._conn.execute(
                "SELECT id, kind, topic, payload, qos, retain, created_at, items FROM records "
                f"WHERE {where} ORDER BY id LIMIT ?",
                (*params, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise translate(exc, "reading pending records") from exc
        return [
            Stored(rid, kind, topic, bytes(payload), qos, bool(retain), created_at, items)
            for rid, kind, topic, payload, qos, retain, created_at, items in rows
        ]

    def records(self, ids: Iterable[int]) -> list[Stored]:
        """The records with these ids that are still stored, in ascending id order (those
        deleted or evicted are simply missing)."""
        self._check_open()
        wanted = sorted({int(i) for i in ids})
        found: list[Stored] = []
        try:
            for start in range(0, len(wanted), MAX_VARIABLES):
                chunk = wanted[start : start + MAX_VARIABLES]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    "SELECT id, kind, topic, payload, qos, retain, created_at, items FROM records "
                    f"WHERE id IN ({marks}) ORDER BY id",
                    chunk,
                ).fetchall()
                found += [
                    Stored(rid, kind, topic, bytes(payload), qos, bool(retain), created_at, items)
                    for rid, kind, topic, payload, qos, retain, created_at, items in rows
                ]
        except sqlite3.Error as exc:
            raise translate(exc, "reading records") from exc
        return found

    def delete(self, ids: Iterable[int]) -> int:
        """Delete the records with these ids in one transaction; returns how many existed."""
        return len(self.delete_returning(ids))

    def delete_returning(self, ids: Iterable[int]) -> list[int]:
        """Like :meth:`delete`, but returns the ids that existed and were deleted."""
        self._check_open()
        wanted = list(dict.fromkeys(int(i) for i in ids))
        if not wanted:
            return []
        return self._journal.transaction("delete", lambda st: self._delete(st, wanted))

    def answered(self, frame_key: str) -> str | None:
        """The result id stored for ``frame_key``, if that frame was already answered."""
        self._check_open()
        return self._answered.get(frame_key)

    def answered_many(self, frame_keys: Sequence[str]) -> dict[str, str]:
        """The result ids stored for those of ``frame_keys`` that were already answered."""
        self._check_open()
        return self._answered.get_many(frame_keys)

    def answered_keys(self) -> list[str]:
        """Every frame key remembered, oldest first (to rebuild an index of them at start)."""
        self._check_open()
        return self._answered.keys()

    def stats(self) -> OutboxStats:
        """A snapshot from memory plus two ``stat()`` calls: cheap enough for every operation."""
        journal = self._journal
        st = journal.state
        return OutboxStats(
            rows=sum(st.rows.values()),
            bytes=st.record_bytes + st.answered_bytes,
            file_bytes=journal.db_bytes + journal.wal_bytes,
            appended=dict(st.appended),
            deleted=dict(st.deleted),
            evicted=dict(st.evicted),
            evicted_items=dict(st.evicted_items),
            rows_by_kind=dict(st.rows),
            budget_bytes=self._budget,
            answered_keys=st.answered_rows,
            answered_bytes=st.answered_bytes,
            commits=journal.commits,
            appended_bytes=self._appended_bytes,
            peak_file_bytes=journal.peak,
            checkpoints=journal.checkpoints,
            storage_full=journal.full_seen,
        )

    def integrity_check(self) -> list[str]:
        """``PRAGMA integrity_check`` as a list of messages (``["ok"]`` when sound)."""
        self._check_open()
        try:
            return [str(r[0]) for r in self._conn.execute("PRAGMA integrity_check")]
        except sqlite3.Error as exc:
            raise translate(exc, "integrity check") from exc

    def close(self) -> None:
        """Vacuum what is owed, checkpoint the WAL into the database (TRUNCATE) and close.
        Idempotent.

        A vacuum or checkpoint that fails (e.g. the disk is full) is logged, not raised: the
        records are already durable in the WAL and the next open recovers them.
        """
        if self._closed:
            return
        try:
            if self._journal.vacuum_owed:
                with contextlib.suppress(OutboxError):
                    self._journal.vacuum_rounds(10**9)
            self._journal.checkpoint("close")
        finally:
            self._closed = True
            self._conn.close()

    # -- helpers -----------------------------------------------------------------------------

    def _over_budget(self) -> bool:
        state = self._journal.state
        return state.record_bytes + state.answered_bytes > self._budget

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"outbox {self._db_path} is closed")

    # -- append ------------------------------------------------------------------------------

    def _append(
        self,
        state: State,
        records: Sequence[Record],
        costs: list[int],
        answered: Sequence[tuple[str, str]],
        now: float,
    ) -> list[int]:
        conn = self._conn
        if answered and self._config.answered_keep > 0:
            self._answered.insert(state, answered)
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        base = 0 if row is None else int(row[0])
        ids = list(range(base + 1, base + 1 + len(records)))
        excess = state.record_bytes + sum(costs) - (self._budget - state.answered_bytes)
        protected = self._protected() if self._protected is not None else frozenset()
        evicted = (
            self._evictor.evict(state, excess, protected, records, costs) if excess > 0 else set()
        )
        for kind, n in Counter(r.kind for r in records).items():
            state.add(state.appended, kind, n)
        survivors = [
            (ids[i], r.kind, costs[i], r.qos, int(r.retain), now, r.topic, r.payload, r.items)
            for i, r in enumerate(records)
            if i not in evicted
        ]
        rows: Counter[str] = Counter()
        size: Counter[str] = Counter()
        for _rid, kind, cost, *_ in survivors:
            rows[kind] += 1
            size[kind] += cost
        for kind, n in rows.items():
            state.add(state.rows, kind, n)
            state.add(state.bytes, kind, size[kind])
        conn.executemany(
            "INSERT INTO records(id, kind, size, qos, retain, created_at, topic, payload, items)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            survivors,
        )
        # The newest id was evicted before it was written: consume it anyway.
        if (
            ids
            and (len(records) - 1) in evicted
            and not conn.execute(
                "UPDATE sqlite_sequence SET seq = ? WHERE name = 'records'", (ids[-1],)
            ).rowcount
        ):
            conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('records', ?)", (ids[-1],))
        self._evictor.enforce_pages(state, protected)
        return ids

    # -- delete ------------------------------------------------------------------------------

    def _delete(self, state: State, ids: list[int]) -> list[int]:
        deleted: list[int] = []
        for start in range(0, len(ids), MAX_VARIABLES):
            chunk = ids[start : start + MAX_VARIABLES]
            marks = ",".join("?" * len(chunk))
            for rid, kind, size in self._conn.execute(
                f"DELETE FROM records WHERE id IN ({marks}) RETURNING id, kind, size", chunk
            ).fetchall():
                deleted.append(rid)
                state.add(state.deleted, kind, 1)
                state.add(state.rows, kind, -1)
                state.add(state.bytes, kind, -size)
        return deleted

"""The hard-example store: every escalation a worker answered, in SQLite, for retraining.

One row per escalation id (the primary key; the first answer wins, so a duplicate finds the
answer it must repeat): the input tensor (the bytes as they arrived), the edge verdict, the
cloud verdict, the node, both models' versions and the times. The table is made through
``sqlite-utils``; rows are tuples in :data:`COLUMNS` order (:mod:`cloud_worker.rows`), written
on one dedicated thread by multi-row ``INSERT OR IGNORE`` statements of
:data:`ROWS_PER_STATEMENT` rows (the rest by ``executemany``), one transaction per
``commit_max_rows`` rows or ``commit_interval_ms``, WAL mode.
:meth:`HardExampleStore.add_many` (the cases of a handler call) and :meth:`HardExampleStore.add`
return a future that resolves once the rows are committed. sqlite3 errors become
:class:`~cloud_worker.errors.StoreError` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import sqlite_utils

from cloud_worker.config import StoreConfig
from cloud_worker.errors import StoreError
from cloud_worker.rows import COLUMNS, TABLE, Answer, Row, example_row, iter_rows, row_of

__all__ = [
    "COLUMNS",
    "ROWS_PER_STATEMENT",
    "TABLE",
    "Answer",
    "HardExampleStore",
    "Row",
    "example_row",
    "iter_rows",
    "now",
    "row_of",
]

_INSERT: Final = (
    f"INSERT OR IGNORE INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
)

ROWS_PER_STATEMENT: Final = 64
"""Rows one INSERT statement writes at most (fewer where SQLite allows fewer variables than
``64 * len(COLUMNS)``). ``executemany`` runs its statement once per row, and the sqlite3
module lets go of the GIL and takes it back around every run: a 512-row commit took the GIL
512 times from the event loop and the model's thread. One statement per 64 rows takes it 8
times, and costs ~20 % less CPU per row (docs/adr/0034-worker-pipeline-and-rows.md)."""


def _multi_insert(rows: int) -> str:
    values = "(" + ", ".join("?" * len(COLUMNS)) + ")"
    return f"INSERT OR IGNORE INTO {TABLE} ({', '.join(COLUMNS)}) VALUES " + ", ".join(
        [values] * rows
    )


def _open_db(path: Path) -> sqlite_utils.Database:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    if TABLE not in db.table_names():
        db[TABLE].create(COLUMNS, pk="id", not_null={"id"})  # type: ignore[union-attr]
        db[TABLE].create_index(["answered_at"])  # type: ignore[union-attr]
    return db


def _open_reader(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _select_answers(reader: sqlite3.Connection, ids: list[str]) -> dict[str, Answer]:
    marks = ",".join("?" * len(ids))
    cursor = reader.execute(
        f"SELECT id, cloud_label, cloud_confidence, cloud_model, worker FROM {TABLE}"
        f" WHERE id IN ({marks})",
        ids,
    )
    return {row[0]: Answer(row[1], row[2], row[3], row[4]) for row in cursor.fetchall()}


class HardExampleStore:
    """``async with HardExampleStore(config) as store``: batched, durable inserts."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hard-examples")
        # Look-ups on a connection and thread of their own: in WAL mode they read while the
        # writer commits, so answering a batch never waits for a commit.
        self._read_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hard-examples-read")
        self._db: sqlite_utils.Database | None = None
        self._reader: sqlite3.Connection | None = None
        self._local = threading.local()
        self._local_lock = threading.Lock()
        self._local_readers: list[sqlite3.Connection] = []
        """Connections of :meth:`lookup_here` (one per calling thread), closed with the store."""
        self._rows: list[Row] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0
        self.rows_written = 0
        self._statement_rows = 0
        """Rows per multi-row INSERT on the writer's connection (0: not yet known)."""
        self._statement = ""

    async def __aenter__(self) -> Self:
        self._db = await self._run(_open_db, self.config.path)
        self._reader = await self._run(_open_reader, self.config.path, pool=self._read_pool)
        self._task = asyncio.create_task(self._writer(), name="hard-example-writer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        db, reader = self._db, self._reader
        self._db = self._reader = None
        loop = asyncio.get_running_loop()
        with self._local_lock:
            others, self._local_readers = self._local_readers, []
        for conn in others:  # a thread still inside a look-up gets a StoreError
            conn.close()
        if reader is not None:
            await loop.run_in_executor(self._read_pool, reader.close)
        if db is not None:
            await loop.run_in_executor(self._pool, db.close)
        self._read_pool.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    def _error(self, what: object) -> StoreError:
        """The one form of this store's errors (sqlite3's are translated here)."""
        return StoreError(f"hard-example store {self.config.path}: {what}")

    async def _run(self, fn: Any, *args: Any, pool: ThreadPoolExecutor | None = None) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool or self._pool, fn, *args)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    @property
    def queued(self) -> int:
        """Rows added and not yet committed."""
        return len(self._rows)

    def add(self, row: dict[str, Any] | Row) -> asyncio.Future[None]:
        """Queue one row; the future resolves once it is committed (or fails with StoreError)."""
        return self.add_many([row if isinstance(row, tuple) else row_of(row)])

    def add_many(self, rows: list[Row]) -> asyncio.Future[None]:
        """Queue rows; the future resolves once all of them are committed (in one transaction,
        with whatever else is queued), or fails with StoreError."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closing:
            fut.set_exception(StoreError("store is closing"))
            return fut
        if not rows:
            fut.set_result(None)
            return fut
        first = not self._rows
        self._rows.extend(rows)
        self._waiters.append(fut)
        self._idle.clear()
        if first or len(self._rows) >= self.config.commit_max_rows:
            self._wake.set()  # the first row starts the commit interval; a full batch ends it
        return fut

    async def flush(self) -> None:
        """Wait until every row added so far is committed."""
        self._wake.set()
        await self._idle.wait()

    async def _writer(self) -> None:
        interval = self.config.commit_interval_ms / 1000.0
        while True:
            if not self._rows:
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._rows) < self.config.commit_max_rows and not self._closing:
                self._wake.clear()
                if len(self._rows) >= self.config.commit_max_rows:  # filled meanwhile
                    self._wake.set()
                try:
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            group, self._rows = self._rows, []
            waiters, self._waiters = self._waiters, []
            try:
                await self._run(self._insert, group)
            except StoreError as exc:
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.commits += 1
            self.rows_written += len(group)
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _insert(self, rows: list[Row]) -> None:
        conn = self._require().conn
        if self._statement_rows == 0:
            limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            self._statement_rows = max(1, min(ROWS_PER_STATEMENT, limit // len(COLUMNS)))
            self._statement = _multi_insert(self._statement_rows)
        per, statement = self._statement_rows, self._statement
        whole = len(rows) - len(rows) % per if per > 1 else 0
        conn.execute("BEGIN")
        try:
            for start in range(0, whole, per):
                conn.execute(statement, list(chain.from_iterable(rows[start : start + per])))
            if whole < len(rows):
                conn.executemany(_INSERT, rows[whole:])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _require(self) -> sqlite_utils.Database:
        if self._db is None:
            raise sqlite3.ProgrammingError("store is closed")
        return self._db

    async def lookup(self, ids: Sequence[str]) -> dict[str, Answer]:
        """The stored answers among ``ids`` (one query, on the store's reading thread)."""
        if not ids:
            return {}
        result: dict[str, Answer] = await self._run(self._lookup, list(ids), pool=self._read_pool)
        return result

    def lookup_ahead(self, ids: Sequence[str]) -> concurrent.futures.Future[dict[str, Answer]]:
        """Start looking up the stored answers among ``ids`` on the store's reading thread, for
        a thread that will need them later (its ``result()`` raises :class:`StoreError`).

        While a model thread is busy with one batch, the next batch's look-up runs here, so
        the model finds its answer ready instead of waiting for SQLite and, between SQLite's
        steps, for the GIL (docs/adr/0035-worker-model-thread.md).
        """
        ids = list(ids)
        done: concurrent.futures.Future[dict[str, Answer]] = concurrent.futures.Future()
        if not ids:
            done.set_result({})
            return done
        try:
            return self._read_pool.submit(self._lookup_translated, ids)
        except RuntimeError:  # the pool was shut down: the store is closed
            done.set_exception(self._error("closed"))
            return done

    def _lookup_translated(self, ids: list[str]) -> dict[str, Answer]:
        try:
            return self._lookup(ids)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def lookup_here(self, ids: Sequence[str]) -> dict[str, Answer]:
        """The stored answers among ``ids``, read on the calling thread (not the event loop's:
        it blocks) with a connection of that thread's own; raises :class:`StoreError`.

        For a thread that calls a model anyway: looking up there, right before the call,
        spares a hand-over to the reading thread and back (docs/adr/0035-worker-model-thread.md).
        """
        if not ids:
            return {}
        try:
            reader = getattr(self._local, "reader", None)
            if reader is None:
                if self._db is None:
                    raise sqlite3.ProgrammingError("store is closed")
                reader = self._local.reader = _open_reader(self.config.path)
                with self._local_lock:
                    self._local_readers.append(reader)
            return _select_answers(reader, list(ids))
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def _lookup(self, ids: list[str]) -> dict[str, Answer]:
        reader = self._reader
        if reader is None:
            raise sqlite3.ProgrammingError("store is closed")
        return _select_answers(reader, ids)

    async def count(self) -> int:
        n: int = await self._run(lambda: self._require()[TABLE].count)
        return n


def now() -> float:
    return time.time()

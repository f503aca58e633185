"""The pending-escalation journal: what a node has acknowledged but not yet finally answered.

A frame whose verdict went to the cloud is acknowledged once its provisional result (edge
verdict, with its result id already fixed) is committed here; the final result replaces the
entry once the node's outbox holds it. After a crash, every entry left is answered at once as
``edge_fallback`` with the same result id (docs/adr/0031-escalation-acks.md). A small SQLite file
of its own, written on one thread; inserts and deletes queued while a commit runs share the next
transaction, in queue order.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS pending ("
    " result_id TEXT PRIMARY KEY, frame_key TEXT NOT NULL, result BLOB NOT NULL)"
)


class JournalError(Exception):
    """The journal file cannot be opened or written (sqlite3 errors, translated here)."""


class Journal:
    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._synchronous = synchronous
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="escalation-journal")
        self._conn: sqlite3.Connection | None = None
        self._ops: list[tuple[str, list[Any], asyncio.Future[None]]] = []
        self._committing = False
        self._last: asyncio.Future[None] | None = None
        self.commits = 0

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as exc:
            raise JournalError(f"escalation journal {self.path}: {exc}") from exc

    async def open(self) -> list[tuple[str, str, bytes]]:
        """Open (creating it if needed); returns every entry left by an earlier run."""
        return list(await self._run(self._open))

    def _open(self) -> list[tuple[str, str, bytes]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute(_SCHEMA)
        self._conn = conn
        rows = conn.execute("SELECT result_id, frame_key, result FROM pending").fetchall()
        return [(str(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    async def add(self, entries: list[tuple[str, str, bytes]]) -> None:
        await self.add_nowait(entries)

    def add_nowait(self, entries: list[tuple[str, str, bytes]]) -> asyncio.Future[None]:
        """Queue an insert now (it commits before anything queued later); await the result.

        Inserts and deletes queued while a commit runs go together into the next transaction,
        in the order they were queued (group commit)."""
        return self._queue("add", entries)

    async def remove(self, result_ids: list[str]) -> None:
        await self.remove_nowait(result_ids)

    def remove_nowait(self, result_ids: list[str]) -> asyncio.Future[None]:
        """Queue a delete now (it commits after everything queued before it); await the
        result."""
        return self._queue("remove", result_ids)

    def _queue(self, kind: str, rows: list[Any]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not rows:
            fut.set_result(None)
            return fut
        self._ops.append((kind, rows, fut))
        if not self._committing:
            self._start_commit()
        return fut

    def _start_commit(self) -> None:
        ops, self._ops = self._ops, []
        self._committing = True
        inner = asyncio.get_running_loop().run_in_executor(self._pool, self._apply, ops)
        inner.add_done_callback(lambda f: self._committed(f, ops))
        self._last = ops[-1][2]

    def _committed(self, inner: asyncio.Future[None], ops: list[Any]) -> None:
        self._committing = False
        exc = inner.exception()
        for _, _, fut in ops:
            if fut.done():
                continue
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(JournalError(f"escalation journal {self.path}: {exc}"))
        self.commits += 1
        if self._ops:
            self._start_commit()

    def _apply(self, ops: list[tuple[str, list[Any], Any]]) -> None:
        conn = self._require()
        with conn:
            conn.execute("BEGIN")
            for kind, rows, _ in ops:
                if kind == "add":
                    conn.executemany("INSERT OR REPLACE INTO pending VALUES (?, ?, ?)", rows)
                else:
                    conn.executemany(
                        "DELETE FROM pending WHERE result_id = ?", [(i,) for i in rows]
                    )

    async def count(self) -> int:
        n: int = await self._run(
            lambda: self._require().execute("SELECT count(*) FROM pending").fetchone()[0]
        )
        return n

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("journal is closed")
        return self._conn

    async def close(self) -> None:
        while self._committing and self._last is not None:  # queued work commits first
            await asyncio.gather(self._last, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, conn.close)
        self._pool.shutdown(wait=True)

"""The pending-escalation journal: what a node has acknowledged but not yet finally answered.

A frame whose verdict went to the cloud is acknowledged once its provisional result (edge
verdict, with its result id already fixed) is committed here; the final result replaces the
entry once the node's outbox holds it. After a crash, every entry left is answered at once as
``edge_fallback`` with the same result id (docs/adr/0031-escalation-acks.md). A small SQLite file
of its own, written on one thread, one transaction per call.
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
        if entries:
            await self._run(self._add, entries)

    def add_nowait(self, entries: list[tuple[str, str, bytes]]) -> asyncio.Future[None]:
        """Submit the insert now (it runs before anything submitted later); await the result."""
        inner = asyncio.get_running_loop().run_in_executor(self._pool, self._add, entries)
        return asyncio.ensure_future(self._translate(inner))

    async def _translate(self, fut: asyncio.Future[None]) -> None:
        try:
            await fut
        except sqlite3.Error as exc:
            raise JournalError(f"escalation journal {self.path}: {exc}") from exc

    def _add(self, entries: list[tuple[str, str, bytes]]) -> None:
        conn = self._require()
        with conn:
            conn.execute("BEGIN")
            conn.executemany("INSERT OR REPLACE INTO pending VALUES (?, ?, ?)", entries)

    async def remove(self, result_ids: list[str]) -> None:
        if result_ids:
            await self._run(self._remove, result_ids)

    def _remove(self, result_ids: list[str]) -> None:
        conn = self._require()
        with conn:
            conn.execute("BEGIN")
            conn.executemany("DELETE FROM pending WHERE result_id = ?", [(i,) for i in result_ids])

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
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, conn.close)
        self._pool.shutdown(wait=True)

"""The node's command journal: every verified command, recorded before it is acknowledged.

One SQLite file, ``{state_dir}/{node_id}.updates/commands.db``, ``synchronous = FULL``: a row
is on disk when :meth:`CommandJournal.record` returns, and only then is the command's PUBLISH
acknowledged to the broker. Rows are keyed by the command's signed id, so a copy delivered
again (the broker's redelivery, an operator's resend, an attacker's replay) finds its row and
runs no more. States: ``received`` (recorded, not yet run) → ``done`` (ran, or was refused
when its turn came). On start the node runs the ``received`` rows in the order they were
recorded (``seq``); ``done`` rows are kept until the command expires (a copy after that is
refused as expired anyway), then deleted.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_node.updates.errors import StateError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    payload BLOB NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received', 'done')),
    received_at REAL NOT NULL,
    done_at REAL,
    outcome TEXT
);
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """A recorded command not yet run: its signed bytes, verified when it was received."""

    seq: int
    id: str
    payload: bytes
    expires_at: float


class CommandJournal:
    """Blocking (the update manager calls it from worker threads); one call at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def open(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the command journal {self.path}: {exc}") from exc
        self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextlib.contextmanager
    def _locked(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                raise StateError(f"the command journal {self.path} is not open")
            try:
                yield self._db
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StateError(f"cannot {doing} in {self.path}: {exc}") from exc

    def done_ids(self) -> set[str]:
        """The ids of the commands that ran (or were refused at their turn)."""
        with self._locked("read commands") as db:
            return {row[0] for row in db.execute("SELECT id FROM commands WHERE state = 'done'")}

    def waiting(self) -> list[Entry]:
        """The commands recorded and not yet run, in the order they were received."""
        with self._locked("read commands") as db:
            rows = db.execute(
                "SELECT seq, id, payload, expires_at FROM commands"
                " WHERE state = 'received' ORDER BY seq"
            )
            return [Entry(seq, id_, bytes(payload), exp) for seq, id_, payload, exp in rows]

    def record(self, commands: list[tuple[str, bytes, float]]) -> list[Entry]:
        """Record ``(id, signed bytes, expires_at)`` in order, in one durable transaction;
        return the entries made (an id recorded already makes none)."""
        made: list[Entry] = []
        now = time.time()
        with self._locked("record commands") as db:
            db.execute("BEGIN IMMEDIATE")
            for id_, payload, expires_at in commands:
                cur = db.execute(
                    "INSERT OR IGNORE INTO commands (id, payload, expires_at, state, received_at)"
                    " VALUES (?, ?, ?, 'received', ?)",
                    (id_, payload, expires_at, now),
                )
                if cur.rowcount == 1 and cur.lastrowid is not None:
                    made.append(Entry(cur.lastrowid, id_, payload, expires_at))
            db.execute("COMMIT")
        return made

    def done(self, id_: str, outcome: str) -> None:
        """The command ran (or was refused at its turn): never run it again."""
        with self._locked(f"mark command {id_} done") as db:
            db.execute(
                "UPDATE commands SET state = 'done', done_at = ?, outcome = ? WHERE id = ?",
                (time.time(), outcome[:1024], id_),
            )

    def prune(self, now: float) -> int:
        """Forget commands run that have expired; return how many."""
        with self._locked("prune commands") as db:
            cur = db.execute(
                "DELETE FROM commands WHERE state = 'done' AND expires_at <= ?", (now,)
            )
            return cur.rowcount

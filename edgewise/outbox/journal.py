"""Every write is one transaction, and the WAL it leaves stays within its share of the bound.

The :class:`Journal` runs the outbox's transactions (IMMEDIATE, on a copy of the committed
:class:`edgewise.outbox.counters.State`, swapped in on commit, the counters written in the same
transaction) and owns what surrounds them: checkpoints, incremental vacuum, the volume's free
space, the WAL estimate and the peak on disk.

* The WAL, bounded at every instant: SQLite's automatic checkpoint is off. Every transaction
  first estimates the WAL frames it will write (its records' bytes plus the pages any
  transaction touches, learned from the last transactions: :class:`FrameEstimate`); if the WAL
  it finds plus that estimate would pass the WAL limit, the WAL is checkpointed and truncated
  (``TRUNCATE``) first. The WAL limit is the WAL allowance (1/16 of the bound, at least 40
  frames, at most a quarter of the bound and 4 MiB), and never more than half of what the
  volume has free beyond its reserve (plus the WAL itself), so that the WAL cannot fill a volume
  smaller than the bound and a checkpoint always has room to grow the file.
  :class:`edgewise.outbox.AsyncOutbox` keeps each group commit within
  :func:`edgewise.outbox.sizing.txn_bytes`, so one transaction fits the allowance. After a
  commit, a WAL at or past the limit is checkpointed too, and
  :meth:`edgewise.outbox.Outbox.close` does the same: at rest the WAL is below the allowance. Freed
  pages are not zeroed into the WAL (``secure_delete = FAST``; Debian builds SQLite with
  ``SECURE_DELETE``, which made deleting 1 MiB of records write 1 MiB of WAL).
* A full volume (SQLITE_FULL, ENOSPC): the transaction is rolled back, the WAL is checkpointed
  and truncated at once (the space it held goes back to the volume, often enough for the
  transaction), and the transaction is tried once more; if it fails again, :class:`StorageFull`
  is raised and the next transaction checkpoints first. An append that would leave less than
  :data:`edgewise.outbox.sizing.VOLUME_RESERVE` (at most 1/16 of the volume) free is refused the
  same way before it writes, so that deletes (deliveries) and checkpoints always find room, and
  the answered keys take at most 1/8 of what the volume can give the outbox. So the outbox works
  again as soon as deliveries or anything else free space, whatever the bound.
* Vacuum: ``auto_vacuum=INCREMENTAL`` is set at creation; after a transaction that deleted rows,
  free pages beyond the free-page allowance (1/32 of the bound, 2 pages .. 4 MiB) are returned
  to the file system with ``incremental_vacuum`` in the same transaction, down to half the
  allowance (hysteresis: pages that the next appends would reuse are kept), as far as the WAL
  limit allows (a page moved is a page written to the WAL); what is left is vacuumed in small
  transactions of its own right after, each after a checkpoint. Free pages never make the file
  grow (SQLite reuses them first), so vacuum that waits costs space only in the file as it is.
* Peak: :attr:`edgewise.outbox.OutboxStats.peak_file_bytes` is the largest db + WAL seen since
  opening, taken where the sum peaks: at the end of each transaction (the WAL holds all its
  frames, the file is not written yet) and during each checkpoint (the file grows while the WAL
  is still full).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from edgewise.outbox.config import OutboxConfig
from edgewise.outbox.counters import State, write_counters
from edgewise.outbox.errors import OutboxError, StorageFull, translate
from edgewise.outbox.sizing import (
    FIRST_ESTIMATE_FRAMES,
    PAGE_SIZE,
    VOLUME_RESERVE,
    WAL_FRAME,
    WAL_HEADER,
    data_frames,
    free_allowance,
    txn_bytes,
    wal_allowance,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Follow-up vacuum transactions run after one operation at most (the rest waits for the next).
_VACUUM_ROUNDS = 8


class Participant(Protocol):
    """Keeps per-transaction memory beside the state (the answered keys' limit, the topics of
    evicted records): told before a transaction begins and once it has ended."""

    def begin(self, writes: bool, room_bytes: int | None) -> None:
        """Before BEGIN. ``writes``: the transaction writes data; ``room_bytes``: what the
        volume can give the outbox (its file, its WAL and the volume's free space beyond the
        reserve), None if unknown."""

    def end(self, committed: bool) -> None:
        """After COMMIT, or after the transaction failed and was rolled back."""


class FrameEstimate:
    """WAL frames a transaction writes besides its rows' own pages, per kind of transaction:
    the most the last 64 of that kind wrote (:data:`FIRST_ESTIMATE_FRAMES` until one is seen)."""

    def __init__(self) -> None:
        self._seen: dict[str, deque[int]] = {}
        self._max: dict[str, int] = {}

    def frames(self, what: str) -> int:
        return self._max.get(what, FIRST_ESTIMATE_FRAMES)

    def learn(self, what: str, frames: int) -> None:
        seen = self._seen.setdefault(what, deque(maxlen=64))
        frames = max(0, frames)
        dropped = seen[0] if len(seen) == seen.maxlen else None
        seen.append(frames)
        top = self._max.get(what, -1)
        self._max[what] = max(seen) if dropped == top and frames < top else max(top, frames)


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _volume(directory: str) -> tuple[int, int] | None:
    """Bytes an unprivileged writer may still use on the volume holding ``directory``, and the
    reserve kept free there (:data:`VOLUME_RESERVE`, at most 1/16 of the volume)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, min(VOLUME_RESERVE, st.f_blocks * st.f_frsize // 16)


class Journal:
    """Runs the transactions of one outbox connection and keeps its WAL within the bound.

    Not thread-safe: used by the one thread that uses its :class:`edgewise.outbox.Outbox`.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        config: OutboxConfig,
        state: State,
        participants: Sequence[Participant],
    ) -> None:
        self._conn = conn
        self._db_path = str(config.path)
        self._wal_path = self._db_path + "-wal"
        self._dir = str(config.path.parent)
        # Sizes on disk: the WAL changes at each commit and checkpoint, the file (WAL mode) only
        # at checkpoints; kept here so that a transaction costs one stat().
        self.db_bytes = _file_size(self._db_path)
        self.wal_bytes = _file_size(self._wal_path)
        #: What is committed (a transaction works on a copy, swapped in on commit).
        self.state = state
        self._participants = tuple(participants)
        self._wal_allowance = wal_allowance(config.max_bytes)
        self._plenty = 16 * (self._wal_allowance + VOLUME_RESERVE)
        self._txn_bytes = txn_bytes(config.max_bytes)
        #: Bytes one transaction should take now: :func:`txn_bytes` of the bound, or less on a
        #: volume with little free (a quarter of what is free beyond the reserve).
        self.txn_bytes_now = self._txn_bytes
        self._volume_seen: tuple[int, int] | None = None
        self._volume_at = 0.0
        self._free_allowance = free_allowance(config.max_bytes)
        # The db file's own share of the bound: the page limit and the free-page allowance.
        self._max_db_pages = (config.max_bytes - self._wal_allowance) // PAGE_SIZE
        self.commits = 0  # write transactions committed since opening
        self.checkpoints = 0
        self.peak = 0  # largest db + WAL seen since opening
        self.full_seen = 0  # transactions that found the disk full (retries included)
        self._full = False  # the last transaction found the disk full: checkpoint first
        self._checkpoint_failing = False
        self._estimate = FrameEstimate()
        self._vacuum_steps = 0  # incremental_vacuum steps of the running transaction
        self.vacuum_owed = False  # free pages beyond the allowance wait for a vacuum

    def _volume(self) -> tuple[int, int] | None:
        """:func:`_volume` of the outbox's directory. A volume with plenty free (16 times what
        the WAL and the reserve need) is looked at again only after a second: no transaction
        gets near its free space meanwhile (another program filling it that fast meets the
        full-disk path)."""
        now = time.monotonic()
        seen = self._volume_seen
        if seen is not None and seen[0] > self._plenty and now - self._volume_at < 1.0:
            return seen
        self._volume_seen, self._volume_at = _volume(self._dir), now
        return self._volume_seen

    def _wal_limit(self, wal: int, volume: tuple[int, int] | None) -> int:
        """The WAL allowance, or, if less, half of what the volume has free besides its reserve
        (the WAL's own space included): a checkpoint may grow the file by up to the WAL."""
        if volume is None:
            return self._wal_allowance
        free, reserve = volume
        return min(self._wal_allowance, max(0, free + wal - reserve) // 2)

    def transaction(self, what: str, work: Callable[[State], T], data_bytes: int = 0) -> T:
        """Run ``work`` in one IMMEDIATE transaction on a copy of the state; swap in on commit.

        ``data_bytes`` (the accounted bytes it writes) sizes its WAL frames: when the WAL plus
        them would pass the WAL limit, the WAL is checkpointed first. On a full disk the WAL is
        checkpointed and truncated and the transaction tried once more.
        """
        for attempt in (1, 2):
            try:
                result = self._attempt(what, work, data_bytes)
            except StorageFull as exc:
                self.full_seen += 1
                released = self._release_wal()
                if attempt == 1 and released:
                    continue  # the WAL's space may be what the transaction lacked
                if not self._full:
                    log.warning(
                        "outbox %s: %s; writes are tried again as they come", self._db_path, exc
                    )
                self._full = True
                raise
            if self._full:
                log.info("outbox %s: writes work again", self._db_path)
                self._full = False
            if self.vacuum_owed:
                self.vacuum_rounds(_VACUUM_ROUNDS)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(self, what: str, work: Callable[[State], T], data_bytes: int) -> T:
        conn = self._conn
        data = data_frames(data_bytes)
        estimate = data + self._estimate.frames(what)
        wal = self.wal_bytes
        volume = self._volume()
        limit = self._wal_limit(wal, volume)
        if wal > WAL_HEADER and (self._full or wal + estimate * WAL_FRAME > limit):
            self.checkpoint(what)
            wal = self.wal_bytes
            volume = self._volume()
        db = self.db_bytes
        state = self.state.copy()
        self._vacuum_steps = 0
        # On a volume smaller than the bound, the answered keys (a cache) take at most an
        # eighth of what the volume can give the outbox, as they do of the budget.
        room = None if volume is None else db + wal + volume[0] - volume[1]
        for participant in self._participants:
            participant.begin(bool(data), room)
        committed = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if data and volume is not None:
                    self._check_volume(data, estimate, volume)
                result = work(state)
                write_counters(conn, self.state, state)
                self._vacuum_if_needed((limit - max(wal, WAL_HEADER)) // WAL_FRAME - estimate)
                conn.execute("COMMIT")
                committed = True
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            self.wal_bytes = _file_size(self._wal_path)  # what the failed one wrote stays
            self.peak = max(self.peak, db + self.wal_bytes)
            raise translate(exc, what) from exc
        finally:
            for participant in self._participants:
                participant.end(committed)
        self.state = state
        self.commits += 1
        # The WAL now holds every frame of the transaction and the file is not written yet.
        after = self.wal_bytes = _file_size(self._wal_path)
        self.peak = max(self.peak, db + after)
        written = (after - max(wal, WAL_HEADER)) // WAL_FRAME
        self._estimate.learn(what, written - data - self._vacuum_steps)
        if volume is not None:  # what the WAL took is no longer free
            volume = (volume[0] - max(0, after - wal), volume[1])
            room = (volume[0] + after - volume[1]) // 4
            self.txn_bytes_now = max(PAGE_SIZE, min(self._txn_bytes, room))
        if after >= self._wal_limit(after, volume):
            self.checkpoint(what)
        return result

    def _check_volume(
        self, data_frames: int, estimate_frames: int, volume: tuple[int, int]
    ) -> None:
        """Refuse a write the volume cannot take whole, or that would leave less than its
        reserve free: that room is what deletes and checkpoints need, so that the outbox can
        always give space back (deliveries delete records; on a full volume even that fails).

        The write needs its WAL frames and, once they are checkpointed with the WAL still
        there, the pages the file grows by (those its free pages cannot take).
        """
        free, reserve = volume
        wal = estimate_frames * WAL_FRAME
        if free > 2 * wal + reserve + data_frames * PAGE_SIZE:
            return  # the common case: no page count needed
        reusable = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        growth = max(0, data_frames - reusable) * PAGE_SIZE
        if free < max(wal + growth, growth + reserve):
            raise StorageFull(
                f"volume of {self._db_path} nearly full: {free} bytes free, this write needs "
                f"about {wal + growth} and {reserve} stay free for deletes and checkpoints"
            )

    def checkpoint(self, what: str) -> bool:
        """Copy the WAL into the database and truncate it; True if that worked.

        Failure (a full disk) is logged (once until one works again), never raised: what the
        WAL holds is durable there.
        """
        wal, before = self.wal_bytes, self.db_bytes
        try:
            busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            if not self._checkpoint_failing:
                log.warning("outbox %s: WAL checkpoint (%s) failed: %s", self._db_path, what, exc)
            self._checkpoint_failing = True
            return False
        finally:
            self.db_bytes = _file_size(self._db_path)
            self.wal_bytes = _file_size(self._wal_path)
            # While the checkpoint ran, the file grew (if it did) with the WAL still whole.
            self.peak = max(self.peak, max(before, self.db_bytes) + wal)
        self.checkpoints += 1
        if self._checkpoint_failing and not busy:
            log.info("outbox %s: WAL checkpoints work again", self._db_path)
            self._checkpoint_failing = False
        return not busy

    def _release_wal(self) -> bool:
        """The disk is full: give the WAL's space back to the volume. True if it shrank."""
        wal = self.wal_bytes
        if wal <= WAL_HEADER:
            return False
        return self.checkpoint("disk full") and self.wal_bytes < wal

    def _vacuum_if_needed(self, room_frames: int) -> None:
        """Return free pages beyond the allowance to the file system, in this transaction.

        Each step removes the file's last page, moving it into a free slot if it is in use (a
        page written to the WAL): at most ``room_frames`` steps, but always enough to bring the
        file back within its share of the bound. What is left is owed (:meth:`_vacuum_rounds`).
        """
        conn = self._conn
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if free * PAGE_SIZE <= self._free_allowance:
            self.vacuum_owed = False
            return
        keep = self._free_allowance // 2 // PAGE_SIZE
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        steps = min(free - keep, max(room_frames, pages - self._max_db_pages, 0))
        # Python's sqlite3 steps a statement once, and incremental_vacuum frees one page per
        # step: so one execute per page.
        for _ in range(steps):
            conn.execute("PRAGMA incremental_vacuum")
        self._vacuum_steps = steps
        self.vacuum_owed = (free - steps) * PAGE_SIZE > self._free_allowance

    def vacuum_rounds(self, rounds: int) -> None:
        """Vacuum what is owed in transactions of its own, each after a checkpoint. Failure is
        logged, never raised: the operation that owed it has committed."""
        for _ in range(rounds):
            if not self.vacuum_owed:
                return
            if self.wal_bytes > WAL_HEADER and not self.checkpoint("vacuum"):
                return
            try:
                self._attempt("vacuum", lambda st: None, 0)
            except OutboxError as exc:
                log.warning("outbox %s: vacuum failed: %s", self._db_path, exc)
                return
            if self._vacuum_steps == 0:
                return  # no room for a single step: the next operations go on

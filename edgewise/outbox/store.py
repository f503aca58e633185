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

Layout and policies (the measurements behind the constants are in their comments):

* ``records`` (``id INTEGER PRIMARY KEY AUTOINCREMENT``: ids are never reused) with an index on
  ``(kind, id)`` so that "oldest record of kind K" is one index seek, not a scan. Small columns
  come before ``topic`` and ``payload`` so reading ``size`` never walks an overflow chain.
* ``answered`` (frame key → result id), written in the same transaction as the results, pruned
  to the newest ``answered_keep`` keys with one range delete per transaction, and never more
  than 1/8 of the byte budget.
* ``counters`` (per kind: appended, deleted, evicted) updated in every write transaction, so
  ``appended - deleted - evicted == stored`` per kind, across restarts.
* Byte accounting: a record costs ``len(topic) + len(payload) + ROW_OVERHEAD`` (56) bytes,
  rounded up the way SQLite stores it (whole overflow pages; a leaf page holds only whole
  cells): :func:`record_cost`. It matches dbstat within 1-6 % from 10 B to 9 KiB payloads. The
  running total is kept in memory and recomputed with ``SUM`` at open.
* The on-disk bound: ``max_bytes`` bounds the db file + its WAL at every instant (at rest, and
  while a transaction writes its pages to the WAL and a checkpoint copies them into the file),
  within 5 % for bounds of 256 KiB and more (ADR 0075). The bound is split three ways: the WAL
  allowance, the free-page allowance, and the page limit (what is left) for live pages. Two
  layers keep live pages within the page limit. (1) The accounted budget, ``(page limit -
  fixed schema pages) * FILL_FACTOR``: before writing, an append evicts until its batch fits
  the budget (:func:`budget_for`). (2) A page-level safety net: before committing, if the live
  pages (``page_count - freelist_count``) exceed the page limit, the append evicts more, by the
  same priority, until they fit. The first layer does the work for ordinary traffic; the second
  catches what accounting cannot see (pages left part-full by evictions), so the bound holds for
  any mix of sizes. The db file never holds more than the page limit plus the free-page
  allowance, so db + WAL stays within the bound as long as the WAL stays within its allowance.
* The WAL, bounded at every instant: SQLite's automatic checkpoint is off. Every transaction
  first estimates the WAL frames it will write (its records' bytes plus the pages any
  transaction touches, learned from the last transactions: :class:`_FrameEstimate`); if the WAL
  it finds plus that estimate would pass the WAL limit, the WAL is checkpointed and truncated
  (``TRUNCATE``) first. The WAL limit is the WAL allowance (1/16 of the bound, at least 40
  frames, at most a quarter of the bound and 4 MiB), and never more than half of what the
  volume has free beyond its reserve (plus the WAL itself), so that the WAL cannot fill a volume
  smaller than the bound and a checkpoint always has room to grow the file.
  :class:`edgewise.outbox.AsyncOutbox` keeps each group commit within :func:`txn_bytes`, so one
  transaction fits the allowance. After a commit, a WAL at or past the limit is checkpointed
  too, and :meth:`Outbox.close` does the same: at rest the WAL is below the allowance. Freed
  pages are not zeroed into the WAL (``secure_delete = FAST``; Debian builds SQLite with
  ``SECURE_DELETE``, which made deleting 1 MiB of records write 1 MiB of WAL).
* A full volume (SQLITE_FULL, ENOSPC): the transaction is rolled back, the WAL is checkpointed
  and truncated at once (the space it held goes back to the volume, often enough for the
  transaction), and the transaction is tried once more; if it fails again, :class:`StorageFull`
  is raised and the next transaction checkpoints first. An append that would leave less than
  :data:`VOLUME_RESERVE` (at most 1/16 of the volume) free is refused the same way before it
  writes, so that deletes (deliveries) and checkpoints always find room, and the answered keys
  take at most 1/8 of what the volume can give the outbox. So the outbox works again as soon
  as deliveries or anything else free space, whatever the bound.
* Vacuum: ``auto_vacuum=INCREMENTAL`` is set at creation; after a transaction that deleted rows,
  free pages beyond the free-page allowance (1/32 of the bound, 2 pages .. 4 MiB) are returned
  to the file system with ``incremental_vacuum`` in the same transaction, down to half the
  allowance (hysteresis: pages that the next appends would reuse are kept), as far as the WAL
  limit allows (a page moved is a page written to the WAL); what is left is vacuumed in small
  transactions of its own right after, each after a checkpoint. Free pages never make the file
  grow (SQLite reuses them first), so vacuum that waits costs space only in the file as it is.
* Peak: :attr:`OutboxStats.peak_file_bytes` is the largest db + WAL seen since opening, taken
  where the sum peaks: at the end of each transaction (the WAL holds all its frames, the file
  is not written yet) and during each checkpoint (the file grows while the WAL is still full).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from edgewise.outbox.config import OutboxConfig
from edgewise.outbox.errors import OutboxCorrupt, OutboxError, StorageFull
from edgewise.outbox.record import Record, Stored

log = logging.getLogger(__name__)

T = TypeVar("T")

#: SQLite page size of every outbox database.
PAGE_SIZE = 4096
#: Bytes of one record's cell besides topic and payload: record header, kind, size, qos,
#: retain, created_at (~28) and the cell's rowid, length and pointer (~6). Measured with dbstat.
_CELL_OVERHEAD = 35
#: Bytes of one entry of the (kind, id) index, with the index pages' fill (measured: 22-25).
_INDEX_OVERHEAD = 22
#: Accounted bytes of one record besides its topic and payload (the two above): 56. Measured
#: on disk for small rows with the default kinds, FIFO-filled pages: 51-55 bytes.
ROW_OVERHEAD = _CELL_OVERHEAD + _INDEX_OVERHEAD
_LEAF_USABLE = PAGE_SIZE - 8  # a table leaf page minus its header
#: Accounted bytes of one answered key besides ``2 * len(frame_key) + len(result_id)`` (the key
#: is stored twice: in the table and in its UNIQUE index).
ANSWERED_OVERHEAD = 32
#: Pages of the empty schema (header page, pointer map, three tables, three indexes,
#: sqlite_sequence): allowed for before anything is accounted.
FIXED_PAGES = 9
#: Accounted bytes per byte of the page limit. The accounting models SQLite's storage of one
#: row closely (see record_cost); what it cannot see is how full B-tree pages are after
#: evictions that leave holes, how cells of mixed sizes pack a leaf page, interior pages, and the
#: (kind, id) index's splits. Measured under 20x-the-bound churn with five payload mixes at
#: 256 KiB .. 4 MiB: with 1.0 the page-level safety net fired on up to 72 % of appends, with
#: 0.85 on 0 % for result-only traffic and up to 31 % for mixes with mid-size rows (where leaf
#: pages end up ~70 % full); 0.9 is the compromise. Either way the file stayed under the bound.
FILL_FACTOR = 0.90

#: Bytes of one WAL frame (a page and its 24-byte header) and of the WAL file's header.
WAL_FRAME = PAGE_SIZE + 24
WAL_HEADER = 32
#: WAL frames one write transaction writes besides its rows' own pages. Measured with the WAL's
#: frame headers: an append of one record that evicts the oldest one and prunes an answered key
#: writes 16 frames (page 1, the pointer map, sqlite_sequence, counters, both ends of records,
#: of its index, of answered and its index, the freelist trunk); 16-22 under churn. The
#: starting estimate, replaced by what the last transactions really wrote.
TXN_FIXED_FRAMES = 24
#: The estimate of a kind of transaction before one is seen: an append that evicts nothing
#: writes 8-10 frames besides its rows.
_FIRST_ESTIMATE_FRAMES = 12
#: Smallest WAL allowance, in frames: one transaction's fixed frames and room for its rows.
MIN_WAL_FRAMES = 40
#: Bytes a write that grows the outbox leaves free on its volume: what deletes (a few frames
#: each) and checkpoints need, so that delivering records can always give space back.
VOLUME_RESERVE = 32 * WAL_FRAME
#: Follow-up vacuum transactions run after one operation at most (the rest waits for the next).
_VACUUM_ROUNDS = 8

_APPLICATION_ID = 0x45445742  # "EDWB": marks a file as an edgewise outbox
_SCHEMA_VERSION = 2
#: Schema 1 lacked the ``items`` columns; it is upgraded in place when opened.
_UPGRADABLE = {1}
_BUSY_TIMEOUT_MS = 5000
_MAX_VARIABLES = 500  # ids per "IN (…)" chunk: well under SQLITE_MAX_VARIABLE_NUMBER

_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26

_SCHEMA = (
    """CREATE TABLE records(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        size INTEGER NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        created_at REAL NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        items INTEGER NOT NULL DEFAULT 1)""",
    "CREATE INDEX records_by_kind ON records(kind, id)",
    """CREATE TABLE answered(
        n INTEGER PRIMARY KEY,
        frame_key TEXT NOT NULL UNIQUE,
        result_id TEXT NOT NULL,
        size INTEGER NOT NULL)""",
    """CREATE TABLE counters(
        kind TEXT PRIMARY KEY,
        appended INTEGER NOT NULL DEFAULT 0,
        deleted INTEGER NOT NULL DEFAULT 0,
        evicted INTEGER NOT NULL DEFAULT 0,
        evicted_items INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID""",
)


@functools.lru_cache(maxsize=4096)
def record_cost(topic: str, payload_len: int) -> int:
    """Accounted bytes of one record: ``len(topic) + payload_len + ROW_OVERHEAD``, rounded up.

    Rounded up the way SQLite stores the row, because that is what it occupies on disk:

    * a row that spills past ``PAGE_SIZE - 35`` bytes keeps a prefix on its leaf page and the
      rest in overflow pages, the last one partly empty: overflow is counted in whole pages;
    * a leaf page holds only whole cells, so a 2.1 KiB row takes a whole 4 KiB page and a
      1.4 KiB row half of one: the cell is counted as its share of a page packed with cells of
      its size (``PAGE_SIZE // cells_per_page``), which for small rows is the cell itself.
    """
    content = len(topic.encode()) + payload_len + _CELL_OVERHEAD - 6
    overflow_pages = 0
    if content > PAGE_SIZE - 35:
        per_page = PAGE_SIZE - 4
        min_local = (PAGE_SIZE - 12) * 32 // 255 - 23
        local = min_local + (content - min_local) % per_page
        if local > PAGE_SIZE - 35:
            local = min_local
        overflow_pages = -(-(content - local) // per_page)
        content = local + 4  # + the pointer to the first overflow page
    cell = content + 6
    share = PAGE_SIZE // (_LEAF_USABLE // cell)
    return max(cell, share) + overflow_pages * PAGE_SIZE + _INDEX_OVERHEAD


def answered_cost(frame_key: str, result_id: str) -> int:
    """Accounted bytes of one answered key (the key is stored twice: table and index)."""
    return 2 * len(frame_key.encode()) + len(result_id.encode()) + ANSWERED_OVERHEAD


def wal_allowance(max_bytes: int) -> int:
    """Largest WAL file, at any instant: 1/16 of the bound, at least :data:`MIN_WAL_FRAMES`
    frames (~161 KiB: one transaction's own pages) but at most a quarter of the bound, and at
    most 4 MiB."""
    return min(max(max_bytes // 16, MIN_WAL_FRAMES * WAL_FRAME), max_bytes // 4, 4 * 1024 * 1024)


def txn_bytes(max_bytes: int) -> int:
    """Accounted bytes one group commit may take (a single larger call still goes alone): half
    of what the WAL allowance leaves besides a transaction's own pages, so that about two
    transactions fit between checkpoints. 32 KiB at a 1 MiB bound, ~2 MiB at the default."""
    frames = wal_allowance(max_bytes) // WAL_FRAME - TXN_FIXED_FRAMES
    return max(PAGE_SIZE, frames * PAGE_SIZE // 2)


def free_allowance(max_bytes: int) -> int:
    """Free pages kept in the file before vacuuming: 1/32 of the bound, 2 pages .. 4 MiB."""
    return min(max(max_bytes // 32, 2 * PAGE_SIZE), 4 * 1024 * 1024)


def page_limit(max_bytes: int) -> int:
    """Bytes of live pages (file minus free pages) allowed at commit: what the WAL and the
    free-page allowances leave of the bound."""
    return max_bytes - wal_allowance(max_bytes) - free_allowance(max_bytes)


def budget_for(max_bytes: int) -> int:
    """The accounted-bytes budget that keeps db + WAL within ``max_bytes`` on disk.

    From the bound: the empty schema's pages, the WAL allowance and the free-page allowance are
    taken off, and the rest is scaled by ``FILL_FACTOR`` for partly filled B-tree pages. At
    1 MiB the budget is 0.70 MiB (70 %); at 4 MiB, 81 %; at 256 MiB, 223 MiB (87 %).
    """
    room = page_limit(max_bytes) - FIXED_PAGES * PAGE_SIZE
    return max(int(room * FILL_FACTOR), PAGE_SIZE)


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
class _State:
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

    def copy(self) -> _State:
        return _State(
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


class _FrameEstimate:
    """WAL frames a transaction writes besides its rows' own pages, per kind of transaction:
    the most the last 64 of that kind wrote (:data:`_FIRST_ESTIMATE_FRAMES` until one is seen)."""

    def __init__(self) -> None:
        self._seen: dict[str, deque[int]] = {}
        self._max: dict[str, int] = {}

    def frames(self, what: str) -> int:
        return self._max.get(what, _FIRST_ESTIMATE_FRAMES)

    def learn(self, what: str, frames: int) -> None:
        seen = self._seen.setdefault(what, deque(maxlen=64))
        frames = max(0, frames)
        dropped = seen[0] if len(seen) == seen.maxlen else None
        seen.append(frames)
        top = self._max.get(what, -1)
        self._max[what] = max(seen) if dropped == top and frames < top else max(top, frames)


class _Unusable(Exception):
    """The file is corrupt or not a database: move it aside."""


def translate(exc: BaseException, what: str) -> OutboxError:
    """The one boundary where sqlite3 and OS errors become :class:`OutboxError`."""
    if isinstance(exc, OutboxError):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        name = getattr(exc, "sqlite_errorname", type(exc).__name__)
        if (code is not None and code & 0xFF == _SQLITE_FULL) or "disk is full" in str(exc):
            return StorageFull(f"{what}: {name}: {exc}")
        return OutboxError(f"{what}: {name}: {exc}")
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return StorageFull(f"{what}: {exc}")
        return OutboxError(f"{what}: {exc}")
    return OutboxError(f"{what}: {exc!r}")


def _is_unusable(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


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


def _data_frames(data_bytes: int) -> int:
    """WAL frames for this many accounted bytes (the accounting already counts whole pages)."""
    return -(-data_bytes // PAGE_SIZE)


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
        self._wal_path = self._db_path + "-wal"
        self._dir = str(config.path.parent)
        # Sizes on disk: the WAL changes at each commit and checkpoint, the file (WAL mode) only
        # at checkpoints; kept here so that a transaction costs one stat().
        self._db_bytes = _file_size(self._db_path)
        self._wal_bytes = _file_size(self._wal_path)
        self.recovered_from: Path | None = recovered_from
        self._kinds = frozenset(config.eviction_order)
        self._budget = budget_for(config.max_bytes)
        self._answered_cap = self._budget // 8
        self._answered_limit = self._answered_cap  # lower while the volume is tight
        self._wal_allowance = wal_allowance(config.max_bytes)
        self._plenty = 16 * (self._wal_allowance + VOLUME_RESERVE)
        self._txn_bytes = txn_bytes(config.max_bytes)
        #: Bytes one transaction should take now: :func:`txn_bytes` of the bound, or less on a
        #: volume with little free (a quarter of what is free beyond the reserve).
        self.txn_bytes_now = self._txn_bytes
        self._volume_seen: tuple[int, int] | None = None
        self._volume_at = 0.0
        self._free_allowance = free_allowance(config.max_bytes)
        self._page_limit = page_limit(config.max_bytes)
        # The db file's own share of the bound: the page limit and the free-page allowance.
        self._max_db_pages = (config.max_bytes - self._wal_allowance) // PAGE_SIZE
        self.page_trims = 0  # times the page-level safety net had to evict (not persisted)
        self._protected: Callable[[], Set[int]] | None = None
        self._commits = 0
        self._checkpoints = 0
        self._appended_bytes = 0
        self._peak = 0
        self._full_seen = 0
        self._full = False  # the last transaction found the disk full: checkpoint first
        self._checkpoint_failing = False
        self._estimate = _FrameEstimate()
        self._vacuum_steps = 0  # incremental_vacuum steps of the running transaction
        self._vacuum_owed = False  # free pages beyond the allowance wait for a vacuum
        # Topics of evicted records, counted when asked for (take_evicted_topics).
        self._evicted_topics: Counter[str] | None = None
        self._txn_topics: Counter[str] | None = None
        self._closed = False
        self._state = self._load_state()

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
        recovered: Path | None = None
        try:
            conn = _connect(path, config)
        except _Unusable as exc:
            log.error("outbox %s is unusable (%s): moving it aside", path, exc)
            recovered = _move_aside(path)
            try:
                conn = _connect(path, config)
            except _Unusable as again:
                raise OutboxCorrupt(f"fresh outbox at {path} is unusable: {again}") from again
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

    def _load_state(self) -> _State:
        conn = self._conn
        state = _State()
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
        for kind in (*self._config.eviction_order, *state.rows, *state.appended):
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
        if self._evicted_topics is None:
            self._evicted_topics = Counter()

    def take_evicted_topics(self) -> Counter[str]:
        """Evicted records per topic since the last call (committed evictions only)."""
        taken = self._evicted_topics if self._evicted_topics is not None else Counter()
        if self._evicted_topics is not None:
            self._evicted_topics = Counter()
        return taken

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
        ids = self._transaction(
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
            for start in range(0, len(wanted), _MAX_VARIABLES):
                chunk = wanted[start : start + _MAX_VARIABLES]
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
        return self._transaction("delete", lambda st: self._delete(st, wanted))

    def answered(self, frame_key: str) -> str | None:
        """The result id stored for ``frame_key``, if that frame was already answered."""
        self._check_open()
        try:
            row = self._conn.execute(
                "SELECT result_id FROM answered WHERE frame_key = ?", (frame_key,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise translate(exc, "reading answered keys") from exc
        return None if row is None else str(row[0])

    def answered_many(self, frame_keys: Sequence[str]) -> dict[str, str]:
        """The result ids stored for those of ``frame_keys`` that were already answered."""
        self._check_open()
        found: dict[str, str] = {}
        try:
            for start in range(0, len(frame_keys), _MAX_VARIABLES):
                chunk = list(frame_keys[start : start + _MAX_VARIABLES])
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT frame_key, result_id FROM answered WHERE frame_key IN ({marks})",
                    chunk,
                )
                found.update((str(k), str(r)) for k, r in rows)
        except sqlite3.Error as exc:
            raise translate(exc, "reading answered keys") from exc
        return found

    def answered_keys(self) -> list[str]:
        """Every frame key remembered, oldest first (to rebuild an index of them at start)."""
        self._check_open()
        try:
            rows = self._conn.execute("SELECT frame_key FROM answered ORDER BY n").fetchall()
        except sqlite3.Error as exc:
            raise translate(exc, "reading answered keys") from exc
        return [str(k) for (k,) in rows]

    def stats(self) -> OutboxStats:
        """A snapshot from memory plus two ``stat()`` calls: cheap enough for every operation."""
        st = self._state
        return OutboxStats(
            rows=sum(st.rows.values()),
            bytes=st.record_bytes + st.answered_bytes,
            file_bytes=self._db_bytes + self._wal_bytes,
            appended=dict(st.appended),
            deleted=dict(st.deleted),
            evicted=dict(st.evicted),
            evicted_items=dict(st.evicted_items),
            rows_by_kind=dict(st.rows),
            budget_bytes=self._budget,
            answered_keys=st.answered_rows,
            answered_bytes=st.answered_bytes,
            commits=self._commits,
            appended_bytes=self._appended_bytes,
            peak_file_bytes=self._peak,
            checkpoints=self._checkpoints,
            storage_full=self._full_seen,
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
            if self._vacuum_owed:
                with contextlib.suppress(OutboxError):
                    self._vacuum_rounds(10**9)
            self._checkpoint("close")
        finally:
            self._closed = True
            self._conn.close()

    # -- transactions ------------------------------------------------------------------------

    def _over_budget(self) -> bool:
        return self._state.record_bytes + self._state.answered_bytes > self._budget

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"outbox {self._db_path} is closed")

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

    def _transaction(self, what: str, work: Callable[[_State], T], data_bytes: int = 0) -> T:
        """Run ``work`` in one IMMEDIATE transaction on a copy of the state; swap in on commit.

        ``data_bytes`` (the accounted bytes it writes) sizes its WAL frames: when the WAL plus
        them would pass the WAL limit, the WAL is checkpointed first. On a full disk the WAL is
        checkpointed and truncated and the transaction tried once more.
        """
        for attempt in (1, 2):
            try:
                result = self._attempt(what, work, data_bytes)
            except StorageFull as exc:
                self._full_seen += 1
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
            if self._vacuum_owed:
                self._vacuum_rounds(_VACUUM_ROUNDS)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(self, what: str, work: Callable[[_State], T], data_bytes: int) -> T:
        conn = self._conn
        data = _data_frames(data_bytes)
        estimate = data + self._estimate.frames(what)
        wal = self._wal_bytes
        volume = self._volume()
        limit = self._wal_limit(wal, volume)
        if wal > WAL_HEADER and (self._full or wal + estimate * WAL_FRAME > limit):
            self._checkpoint(what)
            wal = self._wal_bytes
            volume = self._volume()
        db = self._db_bytes
        state = self._state.copy()
        self._vacuum_steps = 0
        if data:
            # On a volume smaller than the bound, the answered keys (a cache) take at most an
            # eighth of what the volume can give the outbox, as they do of the budget.
            room = self._answered_cap * 8 if volume is None else db + wal + volume[0] - volume[1]
            self._answered_limit = max(0, min(self._answered_cap, room // 8))
        if self._evicted_topics is not None:
            self._txn_topics = Counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if data and volume is not None:
                    self._check_volume(data, estimate, volume)
                result = work(state)
                self._write_counters(state)
                self._vacuum_if_needed((limit - max(wal, WAL_HEADER)) // WAL_FRAME - estimate)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            self._wal_bytes = _file_size(self._wal_path)  # what the failed one wrote stays
            self._peak = max(self._peak, db + self._wal_bytes)
            raise translate(exc, what) from exc
        finally:
            topics, self._txn_topics = self._txn_topics, None
        self._state = state
        self._commits += 1
        if topics and self._evicted_topics is not None:
            self._evicted_topics.update(topics)
        # The WAL now holds every frame of the transaction and the file is not written yet.
        after = self._wal_bytes = _file_size(self._wal_path)
        self._peak = max(self._peak, db + after)
        written = (after - max(wal, WAL_HEADER)) // WAL_FRAME
        self._estimate.learn(what, written - data - self._vacuum_steps)
        if volume is not None:  # what the WAL took is no longer free
            volume = (volume[0] - max(0, after - wal), volume[1])
            room = (volume[0] + after - volume[1]) // 4
            self.txn_bytes_now = max(PAGE_SIZE, min(self._txn_bytes, room))
        if after >= self._wal_limit(after, volume):
            self._checkpoint(what)
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

    def _checkpoint(self, what: str) -> bool:
        """Copy the WAL into the database and truncate it; True if that worked.

        Failure (a full disk) is logged (once until one works again), never raised: what the
        WAL holds is durable there.
        """
        wal, before = self._wal_bytes, self._db_bytes
        try:
            busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            if not self._checkpoint_failing:
                log.warning("outbox %s: WAL checkpoint (%s) failed: %s", self._db_path, what, exc)
            self._checkpoint_failing = True
            return False
        finally:
            self._db_bytes = _file_size(self._db_path)
            self._wal_bytes = _file_size(self._wal_path)
            # While the checkpoint ran, the file grew (if it did) with the WAL still whole.
            self._peak = max(self._peak, max(before, self._db_bytes) + wal)
        self._checkpoints += 1
        if self._checkpoint_failing and not busy:
            log.info("outbox %s: WAL checkpoints work again", self._db_path)
            self._checkpoint_failing = False
        return not busy

    def _release_wal(self) -> bool:
        """The disk is full: give the WAL's space back to the volume. True if it shrank."""
        wal = self._wal_bytes
        if wal <= WAL_HEADER:
            return False
        return self._checkpoint("disk full") and self._wal_bytes < wal

    def _write_counters(self, state: _State) -> None:
        old = self._state
        rows = []
        for kind in sorted({*state.appended, *state.deleted, *state.evicted}):
            da = state.appended.get(kind, 0) - old.appended.get(kind, 0)
            dd = state.deleted.get(kind, 0) - old.deleted.get(kind, 0)
            de = state.evicted.get(kind, 0) - old.evicted.get(kind, 0)
            di = state.evicted_items.get(kind, 0) - old.evicted_items.get(kind, 0)
            if da or dd or de or di:
                rows.append((kind, da, dd, de, di))
        if rows:
            self._conn.executemany(
                "INSERT INTO counters(kind, appended, deleted, evicted, evicted_items) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(kind) DO UPDATE SET appended = appended + excluded.appended, "
                "deleted = deleted + excluded.deleted, evicted = evicted + excluded.evicted, "
                "evicted_items = evicted_items + excluded.evicted_items",
                rows,
            )

    def _vacuum_if_needed(self, room_frames: int) -> None:
        """Return free pages beyond the allowance to the file system, in this transaction.

        Each step removes the file's last page, moving it into a free slot if it is in use (a
        page written to the WAL): at most ``room_frames`` steps, but always enough to bring the
        file back within its share of the bound. What is left is owed (:meth:`_vacuum_rounds`).
        """
        conn = self._conn
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if free * PAGE_SIZE <= self._free_allowance:
            self._vacuum_owed = False
            return
        keep = self._free_allowance // 2 // PAGE_SIZE
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        steps = min(free - keep, max(room_frames, pages - self._max_db_pages, 0))
        # Python's sqlite3 steps a statement once, and incremental_vacuum frees one page per
        # step: so one execute per page.
        for _ in range(steps):
            conn.execute("PRAGMA incremental_vacuum")
        self._vacuum_steps = steps
        self._vacuum_owed = (free - steps) * PAGE_SIZE > self._free_allowance

    def _vacuum_rounds(self, rounds: int) -> None:
        """Vacuum what is owed in transactions of its own, each after a checkpoint. Failure is
        logged, never raised: the operation that owed it has committed."""
        for _ in range(rounds):
            if not self._vacuum_owed:
                return
            if self._wal_bytes > WAL_HEADER and not self._checkpoint("vacuum"):
                return
            try:
                self._attempt("vacuum", lambda st: None, 0)
            except OutboxError as exc:
                log.warning("outbox %s: vacuum failed: %s", self._db_path, exc)
                return
            if self._vacuum_steps == 0:
                return  # no room for a single step: the next operations go on

    # -- append ------------------------------------------------------------------------------

    def _append(
        self,
        state: _State,
        records: Sequence[Record],
        costs: list[int],
        answered: Sequence[tuple[str, str]],
        now: float,
    ) -> list[int]:
        conn = self._conn
        if answered and self._config.answered_keep > 0:
            self._insert_answered(state, answered)
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        base = 0 if row is None else int(row[0])
        ids = list(range(base + 1, base + 1 + len(records)))
        excess = state.record_bytes + sum(costs) - (self._budget - state.answered_bytes)
        protected = self._protected() if self._protected is not None else frozenset()
        evicted = self._evict(state, excess, protected, records, costs) if excess > 0 else set()
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
        self._enforce_pages(state, protected)
        return ids

    def _enforce_pages(self, state: _State, protected: Set[int]) -> None:
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
            self._evict(state, over, protected)
            if state.record_bytes == before:
                return  # only protected records are left (a forwarder's window at most)

    def _eviction_sequence(self, state: _State) -> list[str]:
        """Kinds no longer configured go first, then ``eviction_order``."""
        order = self._config.eviction_order
        return [k for k in state.rows if k not in self._kinds] + list(order)

    def _evict(
        self,
        state: _State,
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
                for start in range(0, len(victims), _MAX_VARIABLES):
                    chunk_ids = victims[start : start + _MAX_VARIABLES]
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

    def _insert_answered(self, state: _State, answered: Sequence[tuple[str, str]]) -> None:
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
        cut = state.answered_max - self._config.answered_keep
        first = state.answered_max - state.answered_rows + 1
        pruned_rows, pruned_bytes = 0, 0
        if cut >= first:
            pruned_rows, pb = conn.execute(
                "SELECT count(*), total(size) FROM answered WHERE n <= ?", (cut,)
            ).fetchone()
            pruned_bytes = int(pb)
        else:
            cut = first - 1
        if state.answered_bytes - pruned_bytes > self._answered_limit:
            over = state.answered_bytes - pruned_bytes - self._answered_limit
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

    # -- delete ------------------------------------------------------------------------------

    def _delete(self, state: _State, ids: list[int]) -> list[int]:
        deleted: list[int] = []
        for start in range(0, len(ids), _MAX_VARIABLES):
            chunk = ids[start : start + _MAX_VARIABLES]
            marks = ",".join("?" * len(chunk))
            for rid, kind, size in self._conn.execute(
                f"DELETE FROM records WHERE id IN ({marks}) RETURNING id, kind, size", chunk
            ).fetchall():
                deleted.append(rid)
                state.add(state.deleted, kind, 1)
                state.add(state.rows, kind, -1)
                state.add(state.bytes, kind, -size)
        return deleted


# -- opening helpers -------------------------------------------------------------------------


def _connect(path: Path, config: OutboxConfig) -> sqlite3.Connection:
    """Check, open and (if new) initialise the database. Raises :class:`_Unusable` if corrupt."""
    fresh = not path.exists() or _inspect(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise translate(exc, f"opening {path}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if fresh:
            _create_schema(conn)
        elif conn.execute("PRAGMA user_version").fetchone()[0] in _UPGRADABLE:
            _upgrade_schema(conn)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxError(f"{path}: could not switch to WAL (journal_mode is {mode})")
        conn.execute(f"PRAGMA synchronous = {config.synchronous}")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints are ours: see module doc
        # Debian's SQLite is built with SECURE_DELETE: every freed page would be zeroed, i.e.
        # written to the WAL, so deleting 1 MiB of records wrote 1 MiB of WAL. FAST zeroes
        # deleted content only in pages written anyway (ADR 0075).
        conn.execute("PRAGMA secure_delete = FAST")
        for kind in config.eviction_order:
            conn.execute("INSERT OR IGNORE INTO counters(kind) VALUES (?)", (kind,))
    except sqlite3.Error as exc:
        conn.close()
        if _is_unusable(exc):
            raise _Unusable(str(exc)) from exc
        raise translate(exc, f"opening {path}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _inspect(path: Path) -> bool:
    """Check an existing file READ-ONLY; True if it is an empty database to initialise.

    Read-only, because a read-write connection to a damaged database would, on close,
    checkpoint its WAL into it and delete the WAL: the evidence we keep when moving it aside.
    Raises :class:`_Unusable` (corrupt, not a database) or :class:`OutboxError` (another
    application's database, a newer schema: not ours to move).
    """
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise translate(exc, f"opening {path}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        check = [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
        if check != ["ok"]:
            raise _Unusable("; ".join(check[:5]))
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
    except sqlite3.Error as exc:
        if _is_unusable(exc):
            raise _Unusable(str(exc)) from exc
        raise translate(exc, f"checking {path}") from exc
    finally:
        conn.close()
    if tables == 0 and app_id == 0:
        return True
    if app_id != _APPLICATION_ID:
        raise OutboxError(f"{path} is a SQLite database of another application: not touched")
    if version != _SCHEMA_VERSION and version not in _UPGRADABLE:
        raise OutboxError(f"{path} has outbox schema {version}; this code knows {_SCHEMA_VERSION}")
    return False


def _upgrade_schema(conn: sqlite3.Connection) -> None:
    """Schema 1 → 2: the ``items`` a record carries and the evicted items per kind."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("ALTER TABLE records ADD COLUMN items INTEGER NOT NULL DEFAULT 1")
        conn.execute("ALTER TABLE counters ADD COLUMN evicted_items INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE counters SET evicted_items = evicted")
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect before the first table
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _move_aside(path: Path) -> Path:
    """Rename the db (and its -wal, -shm) to ``<name>.corrupt-<UTC timestamp>[-n]``.

    The WAL and shared-memory files go first: a stale WAL left next to a fresh database would
    be replayed into it. The moved set keeps SQLite's naming (``X-wal`` next to ``X``), so the
    moved database can be opened with its WAL for a post-mortem.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 0
    while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        for suffix in ("-wal", "-shm", ""):
            source = Path(f"{path}{suffix}")
            if source.exists():
                os.replace(source, Path(f"{target}{suffix}"))
    except OSError as exc:
        raise OutboxCorrupt(f"{path} is corrupt and could not be moved aside: {exc}") from exc
    log.error("outbox %s was corrupt: moved aside to %s", path, target)
    return target

"""How many bytes things cost: the accounting that keeps the outbox within its bound.

* Byte accounting: a record costs ``len(topic) + len(payload) + ROW_OVERHEAD`` (56) bytes,
  rounded up the way SQLite stores it (whole overflow pages; a leaf page holds only whole
  cells): :func:`record_cost`. It matches dbstat within 1-6 % from 10 B to 9 KiB payloads. The
  running total is kept in memory and recomputed with ``SUM`` at open.
* The on-disk bound: ``max_bytes`` bounds the db file + its WAL at every instant (at rest, and
  while a transaction writes its pages to the WAL and a checkpoint copies them into the file),
  within 5 % for bounds of 256 KiB and more (ADR 0075). The bound is split three ways: the WAL
  allowance (:func:`wal_allowance`), the free-page allowance (:func:`free_allowance`), and the
  page limit (what is left, :func:`page_limit`) for live pages. Two layers keep live pages
  within the page limit. (1) The accounted budget, ``(page limit - fixed schema pages) *
  FILL_FACTOR``: before writing, an append evicts until its batch fits the budget
  (:func:`budget_for`). (2) A page-level safety net: before committing, if the live pages
  (``page_count - freelist_count``) exceed the page limit, the append evicts more, by the same
  priority, until they fit (:mod:`edgewise.outbox.eviction`). The first layer does the work for
  ordinary traffic; the second catches what accounting cannot see (pages left part-full by
  evictions), so the bound holds for any mix of sizes. The db file never holds more than the
  page limit plus the free-page allowance, so db + WAL stays within the bound as long as the
  WAL stays within its allowance (:mod:`edgewise.outbox.journal`).
* One group commit of :class:`edgewise.outbox.AsyncOutbox` takes at most :func:`txn_bytes`, so
  that one transaction fits the WAL allowance.
"""

from __future__ import annotations

import functools

#: SQLite page size of every outbox database.
PAGE_SIZE = 4096
#: Bytes of one record's cell besides topic and payload: record header, kind, size, qos,
#: retain, created_at (~28) and the cell's rowid, length and pointer (~6). Measured with dbstat.
CELL_OVERHEAD = 35
#: Bytes of one entry of the (kind, id) index, with the index pages' fill (measured: 22-25).
INDEX_OVERHEAD = 22
#: Accounted bytes of one record besides its topic and payload (the two above): 56. Measured
#: on disk for small rows with the default kinds, FIFO-filled pages: 51-55 bytes.
ROW_OVERHEAD = CELL_OVERHEAD + INDEX_OVERHEAD
LEAF_USABLE = PAGE_SIZE - 8  # a table leaf page minus its header
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
FIRST_ESTIMATE_FRAMES = 12
#: Smallest WAL allowance, in frames: one transaction's fixed frames and room for its rows.
MIN_WAL_FRAMES = 40
#: Bytes a write that grows the outbox leaves free on its volume: what deletes (a few frames
#: each) and checkpoints need, so that delivering records can always give space back.
VOLUME_RESERVE = 32 * WAL_FRAME


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
    content = len(topic.encode()) + payload_len + CELL_OVERHEAD - 6
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
    share = PAGE_SIZE // (LEAF_USABLE // cell)
    return max(cell, share) + overflow_pages * PAGE_SIZE + INDEX_OVERHEAD


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


def data_frames(data_bytes: int) -> int:
    """WAL frames for this many accounted bytes (the accounting already counts whole pages)."""
    return -(-data_bytes // PAGE_SIZE)

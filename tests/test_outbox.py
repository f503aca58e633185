"""The outbox against real SQLite files: durability, the byte bound on disk, eviction, recovery.

Every test uses files in ``tmp_path`` (or a real tiny tmpfs for the disk-full case); nothing is
mocked except, in one test, the rename that moves a corrupt file aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from edgewise import outbox
from edgewise.outbox import (
    AsyncOutbox,
    Outbox,
    OutboxConfig,
    OutboxCorrupt,
    OutboxError,
    Record,
    StorageFull,
    budget_for,
    record_cost,
)
from tests.waiting import eventually

KiB = 1024
MiB = 1024 * KiB
KINDS = ("telemetry", "hard_example", "event", "result")
CORRUPT_SUFFIX = re.compile(r"\.corrupt-\d{8}T\d{6}Z(-\d+)?$")


def config(path: Path, **kwargs: object) -> OutboxConfig:
    """NORMAL unless a test says otherwise: the tests that are about durability say FULL."""
    return OutboxConfig.model_validate({"path": path, "synchronous": "NORMAL", **kwargs})


def rec(kind: str = "result", payload: bytes = b"p", topic: str | None = None) -> Record:
    return Record(kind, topic or f"edge/gw-1/{kind}", payload)


def file_bytes(path: Path) -> int:
    return sum(
        Path(f"{path}{suffix}").stat().st_size
        for suffix in ("", "-wal")
        if Path(f"{path}{suffix}").exists()
    )


def integrity(path: Path) -> list[str]:
    """``PRAGMA integrity_check`` from a connection of our own (not the outbox's)."""
    conn = sqlite3.connect(path)
    try:
        return [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def assert_counts_balance(box: Outbox) -> None:
    """Per kind: appended - deleted - evicted == what the database really holds."""
    st = box.stats()
    held = Counter(s.kind for s in box.pending(10**9))
    for kind in set(st.appended) | set(held):
        remaining = st.appended[kind] - st.deleted[kind] - st.evicted[kind]
        assert remaining == held[kind] == st.rows_by_kind[kind], kind
    assert st.rows == sum(held.values())


# -- round trip, ids, persistence ------------------------------------------------------------


def test_round_trip_keeps_every_field_and_returns_records_in_append_order(tmp_path: Path) -> None:
    records = [
        Record("result", "edge/gw-1/results", b"\x00\x01binary\xff", qos=1, retain=False),
        Record("event", "edge/gw-1/events", b"", qos=0, retain=True),
        Record("telemetry", "edge/gw-1/telemetry", bytes(range(256)) * 8, qos=2),
    ]
    before = time.time()
    with Outbox.open(config(tmp_path / "o.db")) as box:
        ids = box.append(records)
        after = time.time()
        stored = box.pending(10)
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [s.id for s in stored] == ids
    for s, r in zip(stored, records, strict=True):
        assert (s.kind, s.topic, s.payload, s.qos, s.retain) == (
            r.kind,
            r.topic,
            r.payload,
            r.qos,
            r.retain,
        )
        assert isinstance(s.payload, bytes)
        assert before <= s.created_at <= after


def test_pending_pages_by_after_id_and_limit(tmp_path: Path) -> None:
    with Outbox.open(config(tmp_path / "o.db")) as box:
        ids = box.append([rec(payload=bytes([i])) for i in range(10)])
        first = box.pending(4)
        rest = box.pending(100, after_id=first[-1].id)
        assert [s.id for s in first] == ids[:4]
        assert [s.id for s in rest] == ids[4:]
        assert box.pending(0) == []
        assert box.pending(5, after_id=ids[-1]) == []
        with pytest.raises(ValueError, match="limit"):
            box.pending(-1)


def test_ids_are_never_reused_after_delete_and_reopen(tmp_path: Path) -> None:
    cfg = config(tmp_path / "o.db")
    with Outbox.open(cfg) as box:
        ids = box.append([rec() for _ in range(5)])
        assert box.delete(ids) == 5
        assert box.pending(10) == []
    with Outbox.open(cfg) as box:
        (again,) = box.append([rec()])
        assert again == ids[-1] + 1
        assert box.delete([again]) == 1
    with Outbox.open(cfg) as box:
        assert box.append([rec()]) == [again + 1]


def test_records_and_counters_persist_across_close_and_reopen(tmp_path: Path) -> None:
    cfg = config(tmp_path / "o.db")
    with Outbox.open(cfg) as box:
        ids = box.append([rec("result", b"a"), rec("telemetry", b"b"), rec("event", b"c")])
        box.delete([ids[1]])
        before = box.stats()
    with Outbox.open(cfg) as box:
        after = box.stats()
        assert [(s.id, s.payload) for s in box.pending(10)] == [(ids[0], b"a"), (ids[2], b"c")]
        assert after.rows == before.rows == 2
        assert after.bytes == before.bytes
        assert after.appended == before.appended
        assert after.deleted == before.deleted == {**dict.fromkeys(KINDS, 0), "telemetry": 1}


def test_delete_counts_only_ids_that_existed_in_one_transaction(tmp_path: Path) -> None:
    with Outbox.open(config(tmp_path / "o.db")) as box:
        ids = box.append([rec() for _ in range(3)])
        commits = box.stats().commits
        assert box.delete([ids[0], ids[0], 999_999, ids[2]]) == 2
        assert box.stats().commits == commits + 1
        assert box.delete([]) == 0
        assert box.delete([ids[0]]) == 0
        assert [s.id for s in box.pending(10)] == [ids[1]]
        assert box.delete_returning(range(ids[-1] + 5)) == [ids[1]]


def test_a_batch_is_one_transaction_and_an_unknown_kind_writes_nothing(tmp_path: Path) -> None:
    with Outbox.open(config(tmp_path / "o.db")) as box:
        box.append([rec() for _ in range(100)])
        assert box.stats().commits == 1
        with pytest.raises(ValueError, match="not in eviction_order"):
            box.append([rec(), rec("debug")])
        assert box.stats().rows == 100
        assert box.stats().commits == 1


def test_record_and_config_reject_what_they_cannot_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qos"):
        Record("result", "t", b"", qos=3)
    with pytest.raises(ValueError, match="topic"):
        Record("result", "", b"")
    with pytest.raises(ValidationError):
        OutboxConfig(path=tmp_path / "o.db", max_bytes=64 * KiB - 1)
    with pytest.raises(ValidationError, match="twice"):
        OutboxConfig(eviction_order=("result", "event", "result"))
    with pytest.raises(ValidationError):
        OutboxConfig.model_validate({"max_byte": MiB})  # a typo is an error, not a default
    cfg = OutboxConfig()
    with pytest.raises(ValidationError):
        cfg.max_bytes = MiB  # type: ignore[misc]


# -- byte accounting and eviction ----------------------------------------------------------


def test_record_cost_is_payload_plus_topic_plus_overhead_rounded_to_what_sqlite_stores() -> None:
    plain = 1 + 100 + outbox.ROW_OVERHEAD
    assert plain <= record_cost("t", 100) <= plain + 5  # small rows: the plain sum (± rounding)
    assert record_cost("t", 2100) == 4096 + 22  # one cell per leaf page
    assert record_cost("t", 20_000) >= 5 * 4096  # overflow pages are whole pages
    assert record_cost("é", 0) == record_cost("ab", 0)  # topic bytes, not characters


def test_eviction_follows_the_priority_order_with_exact_counts(tmp_path: Path) -> None:
    cfg = config(tmp_path / "o.db", max_bytes=MiB)
    budget = budget_for(cfg.max_bytes)
    payload = b"x" * 300
    cost = {kind: record_cost(f"edge/gw-1/{kind}", 300) for kind in KINDS}
    per_kind = budget // 5 // max(cost.values())
    with Outbox.open(cfg) as box:
        for kind in ("result", "event", "hard_example", "telemetry"):  # results are the oldest
            box.append([rec(kind, payload) for _ in range(per_kind)])
        assert box.stats().evicted_total == 0
        stored = sum(cost[k] * per_kind for k in KINDS)
        # Enough new results to push out all telemetry and part of the hard examples.
        want_free = cost["telemetry"] * per_kind + cost["hard_example"] * (per_kind // 2)
        n_new = (budget - stored + want_free) // cost["result"] + 1
        box.append([rec("result", payload) for _ in range(n_new)])
        st = box.stats()
        excess = stored + n_new * cost["result"] - budget
        expect_hard = -(-(excess - cost["telemetry"] * per_kind) // cost["hard_example"])
        assert box.page_trims == 0  # the accounting alone did it: the counts below are exact
        assert st.evicted == {
            "telemetry": per_kind,
            "hard_example": expect_hard,
            "event": 0,
            "result": 0,
        }
        assert st.bytes <= budget
        oldest_hard = [s for s in box.pending(10**6) if s.kind == "hard_example"]
        assert len(oldest_hard) == per_kind - expect_hard
        assert_counts_balance(box)


def test_a_batch_bigger_than_the_whole_bound_keeps_its_newest_highest_priority_records(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path / "o.db", max_bytes=256 * KiB)
    budget = budget_for(cfg.max_bytes)
    payload = b"r" * 1000
    with Outbox.open(cfg) as box:
        old = box.append([rec("result", payload) for _ in range(10)])
        cost = record_cost("edge/gw-1/result", 1000)
        n = 2 * budget // cost
        batch = [
            rec("telemetry" if i % 2 else "result", payload + i.to_bytes(4, "big"))
            for i in range(n)
        ]
        ids = box.append(batch)  # never raises for "outbox full"
        assert len(ids) == n and ids == list(range(old[-1] + 1, old[-1] + 1 + n))
        kept = box.pending(10**6)
        st = box.stats()
        assert all(s.kind == "result" for s in kept)
        fit = budget // record_cost("edge/gw-1/result", 1004)
        assert len(kept) == fit
        newest_results = [i for i, r in zip(ids, batch, strict=True) if r.kind == "result"]
        assert [s.id for s in kept] == newest_results[-fit:]
        assert st.evicted["telemetry"] == n // 2
        assert st.evicted["result"] == 10 + (n - n // 2) - fit
        assert_counts_balance(box)
        assert box.append([rec()]) == [ids[-1] + 1]  # evicted ids are not reused either
    assert file_bytes(cfg.path) <= cfg.max_bytes


def test_evicted_topics_are_counted_when_asked_and_match_the_eviction_counts(
    tmp_path: Path,
) -> None:
    with Outbox.open(config(tmp_path / "o.db", max_bytes=256 * KiB)) as box:
        box.append([rec("result", b"r" * 400, topic="a/1") for _ in range(100)])
        assert box.take_evicted_topics() == Counter()  # not asked for: nothing counted
        box.count_evicted_topics()
        for i in range(600):
            box.append([rec("result", b"r" * 400, topic=f"b/{i % 3}")])
        taken = box.take_evicted_topics()
        assert taken["a/1"] == 100  # the oldest went first, all of them
        assert taken.total() == box.stats().evicted["result"]  # every eviction, by topic
        assert box.take_evicted_topics() == Counter()  # taken: counted afresh


def test_eviction_counts_survive_reopen(tmp_path: Path) -> None:
    cfg = config(tmp_path / "o.db", max_bytes=128 * KiB)
    with Outbox.open(cfg) as box:
        for _ in range(150):
            box.append([rec("telemetry", b"t" * 500), rec("result", b"r" * 500)])
        before = box.stats()
    assert before.evicted["telemetry"] > 0
    with Outbox.open(cfg) as box:
        after = box.stats()
        assert after.evicted == before.evicted
        assert after.appended == before.appended
        assert after.bytes == before.bytes  # recomputed with SUM at open
        assert_counts_balance(box)


def test_a_kind_dropped_from_the_config_is_still_delivered_and_evicted_first(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    with Outbox.open(config(path, max_bytes=256 * KiB)) as box:
        box.append([rec("event", b"e" * 300) for _ in range(20)])
    narrowed = config(path, max_bytes=256 * KiB, eviction_order=("telemetry", "result"))
    with Outbox.open(narrowed) as box:
        assert [s.kind for s in box.pending(100)] == ["event"] * 20  # still delivered
        with pytest.raises(ValueError, match="not in eviction_order"):
            box.append([rec("event")])
        while box.stats().evicted["event"] < 20:
            box.append([rec("telemetry", b"t" * 300)])
        st = box.stats()
        assert st.evicted["event"] == 20 and st.evicted["telemetry"] == 0
        assert_counts_balance(box)


def test_a_smaller_bound_at_reopen_evicts_down_to_it_at_once(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox.open(config(path, max_bytes=4 * MiB)) as box:
        box.append([rec("result", b"r" * 400) for _ in range(5000)])
    with Outbox.open(config(path, max_bytes=256 * KiB)) as box:
        st = box.stats()
        assert st.bytes <= st.budget_bytes
        assert st.evicted["result"] > 0
        assert_counts_balance(box)
    assert file_bytes(path) <= 256 * KiB


def churn(
    box: Outbox, rng: random.Random, steps: int, check: Callable[[int], None]
) -> tuple[int, int]:
    """Realistic traffic: results, telemetry windows, hard examples, events; the uplink comes and
    goes (deliveries stop, evictions start). Returns (records appended, records delivered)."""
    mix = [
        ("result", 150, 600, 12),
        ("telemetry", 600, 2500, 3),
        ("hard_example", 2000, 12_000, 1),
        ("event", 80, 400, 2),
    ]
    weights = [m[3] for m in mix]
    appended = delivered = frame = 0
    online = True
    for step in range(steps):
        if step % 150 == 0:
            online = not online
        batch, answered = [], []
        for _ in range(rng.randint(1, 48)):
            kind, lo, hi, _w = rng.choices(mix, weights)[0]
            batch.append(Record(kind, f"edge/gw-1/{kind}", rng.randbytes(rng.randint(lo, hi))))
            if kind == "result":
                frame += 1
                answered.append((f"cam-{frame % 5}/digits/{frame}", f"r-{frame:032d}"))
        box.append(batch, answered)
        appended += len(batch)
        check(step)
        if online:
            delivered += box.delete(s.id for s in box.pending(rng.randint(8, 96)))
            check(step)
    return appended, delivered


@pytest.mark.parametrize("max_bytes", [MiB, 4 * MiB], ids=["1MiB", "4MiB"])
def test_file_on_disk_stays_within_the_bound_under_long_churn(
    tmp_path: Path, max_bytes: int
) -> None:
    # synchronous=OFF: fsync changes nothing about sizes, and this test makes ~10^4 commits.
    cfg = config(tmp_path / "o.db", max_bytes=max_bytes, synchronous="OFF", answered_keep=5000)
    worst = 0
    rng = random.Random(max_bytes)
    with Outbox.open(cfg) as box:

        def check(step: int) -> None:
            nonlocal worst
            size = file_bytes(cfg.path)
            worst = max(worst, size)
            assert size <= max_bytes * 1.05, f"step {step}: {size} > {max_bytes} * 1.05"
            assert box.stats().file_bytes == size

        steps = 0
        while box.stats().appended["result"] * 400 < 12 * max_bytes:  # ~ 12x the bound
            churn(box, rng, 300, check)
            steps += 300
        st = box.stats()
        assert st.evicted_total > 0  # the bound was reached, many times over
        assert worst > 0.8 * max_bytes  # … and the file did grow to use it
        assert_counts_balance(box)
        assert box.integrity_check() == ["ok"]
    assert file_bytes(cfg.path) <= max_bytes


def test_draining_the_outbox_gives_the_space_back_to_the_file_system(tmp_path: Path) -> None:
    cfg = config(tmp_path / "o.db", max_bytes=4 * MiB)
    with Outbox.open(cfg) as box:
        box.append([rec("result", b"r" * 900) for _ in range(3000)])
        full = file_bytes(cfg.path)
        assert full > 3 * MiB
        while batch := box.pending(200):
            box.delete(s.id for s in batch)
    # Empty: the schema, at most half the free-page allowance, a truncated WAL.
    assert file_bytes(cfg.path) <= 9 * 4096 + 4 * MiB // 64 + 8192
    assert integrity(cfg.path) == ["ok"]


class Sampler:
    """db + WAL size on disk every millisecond, on its own thread (independent of the outbox)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.largest = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(FileNotFoundError):  # between a stat and a truncation
                self.largest = max(self.largest, file_bytes(self.path))
            self.samples += 1
            time.sleep(0.001)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize(
    ("max_bytes", "payload"),
    [(MiB, 600), (MiB, 6000), (MiB, 20_000), (4 * MiB, 9000)],
    ids=["1MiB-600B", "1MiB-6KB", "1MiB-20KB", "4MiB-9KB"],
)
def test_db_and_wal_stay_within_105_percent_at_every_commit_and_checkpoint(
    tmp_path: Path, max_bytes: int, payload: int
) -> None:
    """Many callers (group commits) through an outage of 4x the bound, then a drain (deletes,
    vacuum). Before ADR 0075 the WAL of one large group commit came on top of a full file:
    115 % with 600-byte records, 141 % with 6 KB ones (freed pages zeroed into the WAL)."""
    cfg = config(tmp_path / "o.db", max_bytes=max_bytes, synchronous="OFF")
    rng = random.Random(payload)

    async def main() -> None:
        async with AsyncOutbox(cfg) as box:
            frame = 0

            async def caller() -> None:
                nonlocal frame
                while box.stats().appended_bytes < 4 * max_bytes:
                    frame += 1
                    size = rng.randint(payload // 2, payload * 3 // 2)
                    await box.append(
                        [rec(payload=rng.randbytes(size))], [(f"k{frame}", f"r{frame}")]
                    )

            with Sampler(cfg.path) as sampler:
                await asyncio.gather(*(caller() for _ in range(128)))
                assert box.stats().evicted_total > 0
                while batch := await box.pending(256):
                    await asyncio.gather(*(box.delete([s.id]) for s in batch))
            peak = box.stats().peak_file_bytes
        assert sampler.samples > 0
        # The outbox's own peak, taken where the sum peaks, sees at least what a sampler sees.
        assert sampler.largest <= peak <= 1.05 * max_bytes
        assert peak > 0.75 * max_bytes  # the bound was used

    run(main())


def test_deleting_records_writes_a_few_wal_frames_not_the_deleted_bytes(tmp_path: Path) -> None:
    """Debian's SQLite zeroes every freed page (SECURE_DELETE): deleting 600 KB of records
    wrote 600 KB of WAL. ``secure_delete = FAST`` zeroes only pages written anyway."""
    cfg = config(tmp_path / "o.db", max_bytes=64 * MiB)
    with Outbox.open(cfg) as box:
        ids = box.append([rec(payload=b"x" * 6000) for _ in range(100)])
        box._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        assert box.delete(ids) == 100
        wal = Path(f"{cfg.path}-wal").stat().st_size
    frames = (wal - 32) // (4096 + 24)
    assert 0 < frames <= 16, f"{frames} WAL frames to delete 100 records of 6 KB"


def test_group_commits_take_at_most_one_transactions_bytes(tmp_path: Path) -> None:
    cfg = config(tmp_path / "o.db", max_bytes=MiB)

    async def main() -> None:
        async with AsyncOutbox(cfg) as box:
            assert box.max_txn_bytes == outbox.store.txn_bytes(MiB) == 32 * KiB
            await asyncio.gather(*(box.append([rec(payload=b"x" * 4000)]) for _ in range(64)))
            # 64 records of ~4 KB: 8 per transaction at most, all queued at once.
            assert box.append_groups >= 8
            assert box.stats().rows + box.stats().evicted_total == 64

    run(main())


# -- deduplication table ---------------------------------------------------------------------


def test_answered_keys_deduplicate_and_survive_reopen(tmp_path: Path) -> None:
    cfg = config(tmp_path / "o.db")
    with Outbox.open(cfg) as box:
        box.append([rec()], answered=[("cam-1/digits/1", "rid-1")])
        assert box.answered("cam-1/digits/1") == "rid-1"
        assert box.answered("cam-1/digits/2") is None
        # A redelivered frame answered again keeps its first result id.
        box.append([rec()], answered=[("cam-1/digits/1", "rid-OTHER")])
        assert box.answered("cam-1/digits/1") == "rid-1"
        assert box.stats().answered_keys == 1
    with Outbox.open(cfg) as box:
        assert box.answered("cam-1/digits/1") == "rid-1"


def test_answered_keys_are_pruned_to_the_newest_answered_keep(tmp_path: Path) -> None:
    cfg = config(tmp_path / "o.db", answered_keep=10)
    with Outbox.open(cfg) as box:
        for start in range(0, 25, 4):
            keys = [(f"f{i}", f"r{i}") for i in range(start, min(start + 4, 25))]
            box.append([rec() for _ in keys], answered=keys)
            assert box.stats().answered_keys == min(start + len(keys), 10)
        assert [box.answered(f"f{i}") for i in range(25)] == [None] * 15 + [
            f"r{i}" for i in range(15, 25)
        ]
    with Outbox.open(cfg) as box:
        st = box.stats()
        assert st.answered_keys == 10
        assert st.answered_bytes == sum(2 * len(f"f{i}") + len(f"r{i}") + 32 for i in range(15, 25))


def test_answered_keys_never_take_more_than_an_eighth_of_the_budget(tmp_path: Path) -> None:
    cfg = config(tmp_path / "o.db", max_bytes=128 * KiB, answered_keep=100_000)
    with Outbox.open(cfg) as box:
        for batch in range(50):
            keys = [(f"cam-1/digits/{batch}-{i}", f"{batch}-{i}".rjust(36, "0")) for i in range(50)]
            box.append([], answered=keys)
        st = box.stats()
        assert 0 < st.answered_bytes <= st.budget_bytes // 8
        assert box.answered("cam-1/digits/49-49") is not None
        assert box.answered("cam-1/digits/0-0") is None
    assert file_bytes(cfg.path) <= 128 * KiB


def test_answered_keep_zero_disables_the_table(tmp_path: Path) -> None:
    with Outbox.open(config(tmp_path / "o.db", answered_keep=0)) as box:
        box.append([rec()], answered=[("k", "r")])
        assert box.answered("k") is None
        assert box.stats().rows == 1


# -- corruption ------------------------------------------------------------------------------


def test_a_garbage_file_is_moved_aside_with_its_wal_and_a_fresh_outbox_works(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    garbage = random.Random(7).randbytes(3 * 4096)
    path.write_bytes(garbage)
    Path(f"{path}-wal").write_bytes(b"not a wal either")
    with Outbox.open(config(path)) as box:
        moved = box.recovered_from
        assert moved is not None and moved.parent == tmp_path
        assert CORRUPT_SUFFIX.search(moved.name) and moved.name.startswith("o.db.corrupt-")
        assert moved.read_bytes() == garbage  # kept, byte for byte
        assert Path(f"{moved}-wal").read_bytes() == b"not a wal either"
        assert box.append([rec()]) == [1]
        assert [s.id for s in box.pending(5)] == [1]
    with Outbox.open(config(path)) as box:
        assert box.recovered_from is None
    assert integrity(path) == ["ok"]


def test_a_file_truncated_mid_page_is_moved_aside_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox.open(config(path)) as box:
        box.append([rec("result", b"x" * 300) for _ in range(2000)])
    size = path.stat().st_size
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    os.truncate(path, size // 2 + 123)
    truncated = path.read_bytes()
    with Outbox.open(config(path)) as box:
        assert box.recovered_from is not None
        assert box.recovered_from.read_bytes() == truncated
        assert box.stats().rows == 0
        box.append([rec()])
    assert integrity(path) == ["ok"]
    assert len(list(tmp_path.glob("o.db.corrupt-*Z"))) == 1  # (plus its -wal and -shm)


def test_two_recoveries_in_the_same_second_do_not_overwrite_each_other(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    moved = []
    for content in (b"first garbage" * 100, b"second garbage" * 100):
        path.write_bytes(content)
        with Outbox.open(config(path)) as box:
            moved.append(box.recovered_from)
        path.unlink()
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    assert moved[0] != moved[1]
    assert {m.read_bytes()[:5] for m in moved if m} == {b"first", b"secon"}


def test_a_corrupt_file_that_cannot_be_moved_aside_raises_outbox_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"garbage" * 1000)

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "read-only", str(src))

    monkeypatch.setattr("edgewise.outbox.quarantine.os.replace", refuse)
    with pytest.raises(OutboxCorrupt, match="could not be moved aside"):
        Outbox.open(config(path))
    assert path.read_bytes() == b"garbage" * 1000


def test_moving_a_corrupt_file_aside_is_durable_before_the_fresh_file_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renames are made durable (the directory fsynced) before the fresh database is
    created: after a power cut the corrupt file is never back under the outbox's name."""
    import edgewise.outbox.quarantine as quarantine

    path = tmp_path / "o.db"
    path.write_bytes(b"garbage" * 1000)
    synced: list[tuple[Path, bool]] = []
    real = quarantine.fsync_dir

    def record(d: Path) -> None:
        synced.append((d, path.exists()))  # whether the fresh file was already there
        real(d)

    monkeypatch.setattr(quarantine, "fsync_dir", record)
    box = Outbox.open(config(path))
    box.close()
    assert synced == [(tmp_path, False)]
    assert [p.name for p in tmp_path.glob("o.db.corrupt-*")]


def test_another_applications_database_is_refused_not_moved(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE precious(x)")
    conn.commit()
    conn.close()
    with pytest.raises(OutboxError, match="another application"):
        Outbox.open(config(path))
    assert list(tmp_path.glob("*.corrupt-*")) == []


# -- kill -9 ---------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from edgewise.outbox import Outbox, OutboxConfig, Record

    path, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    box = Outbox.open(OutboxConfig(path=Path(path), synchronous="FULL", max_bytes=64 << 20))
    print("OPEN", flush=True)
    while True:
        batch = [
            Record("result", "edge/gw-1/results", rng.randbytes(rng.randint(10, 6000)))
            for _ in range(rng.randint(1, 64))
        ]
        ids = box.append(batch)
        print("A", *ids, flush=True)
        if rng.random() < 0.3:
            old = [s.id for s in box.pending(rng.randint(1, 40))]
            print("D", *old, flush=True)  # announced BEFORE: these may or may not be gone
            box.delete(old)
    """
)


def test_kill_9_mid_append_leaves_a_database_that_passes_integrity_check(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    env = {**os.environ, "PYTHONPATH": str(Path(outbox.__file__).resolve().parents[2])}
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    committed: set[int] = set()
    reported_appended: set[int] = set()
    for round_ in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(seed + round_)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert child.stdout is not None
        lines: list[str] = []
        try:
            assert child.stdout.readline() == "OPEN\n"
            for _ in range(rng.randint(1, 80)):  # a random moment: mid-append most likely
                lines.append(child.stdout.readline())
        finally:
            child.send_signal(signal.SIGKILL)
            lines += child.stdout.read().splitlines(keepends=True)
            child.wait()
        assert child.returncode == -signal.SIGKILL
        # The child printed ids only after their commit returned: those must all be there.
        for line in lines:
            if not line.endswith("\n"):
                continue  # cut off by the kill
            tag, *ids = line.split()
            if tag == "A":
                committed.update(map(int, ids))
                reported_appended.update(map(int, ids))
            elif tag == "D":
                committed.difference_update(map(int, ids))
        assert integrity(path) == ["ok"], f"seed {seed} round {round_}"
        with Outbox.open(config(path, max_bytes=64 * MiB, synchronous="FULL")) as box:
            assert box.recovered_from is None
            present = {s.id for s in box.pending(10**9)}
            assert box.integrity_check() == ["ok"]
            assert_counts_balance(box)
        assert committed <= present, f"seed {seed}: lost {sorted(committed - present)[:10]}"
    assert reported_appended, "the child never committed anything"


# -- disk full -------------------------------------------------------------------------------


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (the max_page_count test still runs)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_storage_full_on_a_real_full_filesystem_writes_nothing_and_recovers(
    tiny_filesystem: Path,
) -> None:
    path = tiny_filesystem / "o.db"
    filler = tiny_filesystem / "filler"
    filler.write_bytes(b"\0" * 64 * KiB)
    # The outbox's own bound is never the limit here; FULL, as on a device.
    cfg = config(path, max_bytes=64 * MiB, synchronous="FULL")
    committed: list[int] = []
    box = Outbox.open(cfg)
    try:
        for i in range(1000):
            before = box.stats()
            try:
                committed += box.append(
                    [rec("result", bytes([i % 256]) * 7000), rec("event", b"e" * 3000)],
                    answered=[(f"frame-{i}", f"result-{i}")],
                )
            except StorageFull:
                failed = i
                break
        else:
            pytest.fail("a 256 KiB filesystem never filled up")
        after = box.stats()
        assert (after.rows, after.bytes, after.appended, after.answered_keys) == (
            before.rows,
            before.bytes,
            before.appended,
            before.answered_keys,
        )
        assert [s.id for s in box.pending(10**6)] == committed
        assert box.answered(f"frame-{failed}") is None
        assert box.answered(f"frame-{failed - 1}") == f"result-{failed - 1}"
        assert box.integrity_check() == ["ok"]
        with pytest.raises(StorageFull):  # the same write again: still no room
            box.append([rec("result", b"x" * 7000), rec("event", b"e" * 3000)])
        filler.unlink()  # space comes back …
        committed += box.append([rec("result", b"y" * 7000)], answered=[("late", "r-late")])
        assert [s.id for s in box.pending(10**6)] == committed
    finally:
        box.close()
    with Outbox.open(cfg) as box:
        assert [s.id for s in box.pending(10**6)] == committed
        assert box.answered("late") == "r-late"
        assert box.integrity_check() == ["ok"]


def test_storage_full_from_the_page_limit_rolls_back_and_deleting_frees_room(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path / "o.db", max_bytes=64 * MiB)
    with Outbox.open(cfg) as box:
        ids = box.append([rec("result", b"r" * 6000) for _ in range(40)])
        pages = box._conn.execute("PRAGMA page_count").fetchone()[0]
        box._conn.execute(f"PRAGMA max_page_count = {pages + 4}")
        before = box.stats()
        with pytest.raises(StorageFull):
            box.append([rec("result", b"n" * 6000) for _ in range(10)], answered=[("k", "r")])
        after = box.stats()
        assert (after.rows, after.bytes, after.appended) == (
            before.rows,
            before.bytes,
            before.appended,
        )
        assert box.answered("k") is None
        assert [s.id for s in box.pending(100)] == ids
        assert box.delete(ids[:20]) == 20  # the outbox's own delete frees pages …
        more = box.append([rec("result", b"n" * 6000) for _ in range(10)], answered=[("k", "r")])
        assert [s.id for s in box.pending(100)] == ids[20:] + more
        assert box.answered("k") == "r"
        assert box.integrity_check() == ["ok"]


def fill_volume(path: Path) -> None:
    """Take every free byte of the file system (the last write or the close fails)."""
    with contextlib.suppress(OSError), path.open("ab") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()


def test_on_a_volume_smaller_than_the_bound_the_outbox_never_fills_it_itself(
    small_filesystem: Callable[[str], Path],
) -> None:
    """The default bound (its WAL allowance alone is 4 MiB) on a 2 MiB volume, 1 MiB of it
    another file's: 20 MiB of records and answered keys go through, delivered as they go.
    Before ADR 0075 the WAL grew until the volume was full and stayed so."""
    volume = small_filesystem("2m")
    (volume / "other").write_bytes(b"\0" * MiB)
    rng = random.Random(2)
    with Outbox.open(config(volume / "o.db", synchronous="FULL")) as box:
        frame = 0
        while box.stats().appended_bytes < 20 * MiB:
            for _ in range(4):
                frame += 1
                size = rng.randint(200, 3000)
                box.append([rec(payload=rng.randbytes(size))], [(f"cam-1/{frame}", f"r{frame}")])
            box.delete(s.id for s in box.pending(100))
        st = box.stats()
        assert st.storage_full == 0
        assert st.answered_keys < frame  # the cache of answered keys fits the volume too
        assert box.integrity_check() == ["ok"]


def test_a_volume_the_outbox_filled_still_takes_deletes_and_recovers_once_space_is_freed(
    small_filesystem: Callable[[str], Path],
) -> None:
    """The uplink is down: records fill a 2 MiB volume (the bound is 256 MiB). Deliveries must
    still be able to delete (deletes need WAL space too), and once another file goes, appends
    work again, in the pages the deliveries freed."""
    volume = small_filesystem("2m")
    other = volume / "other"
    other.write_bytes(b"\0" * 512 * KiB)
    cfg = config(volume / "o.db", synchronous="FULL")
    with Outbox.open(cfg) as box:
        stored: list[int] = []
        for i in range(10_000):
            try:
                stored += box.append([rec(payload=bytes([i % 256]) * 2000)], [(f"f{i}", "r")])
            except StorageFull:
                break
        else:
            pytest.fail("a 2 MiB volume never filled up")
        assert len(stored) > 300  # the volume, not the outbox's bound, was the limit
        assert box.stats().rows == len(stored)
        assert box.delete(stored[:200]) == 200  # a delivery: works on the full volume
        size = cfg.path.stat().st_size
        other.unlink()
        more = box.append([rec(payload=b"n" * 2000) for _ in range(50)])
        assert cfg.path.stat().st_size == size  # in the pages the deliveries freed
        assert [s.id for s in box.pending(10**6)] == stored[200:] + more
        assert box.integrity_check() == ["ok"]
        assert_counts_balance(box)


def test_on_a_full_volume_the_outbox_gives_back_its_wal_space_and_writes(
    small_filesystem: Callable[[str], Path],
) -> None:
    volume = small_filesystem("2m")
    cfg = config(volume / "o.db", max_bytes=64 * MiB, synchronous="FULL")
    wal = Path(f"{cfg.path}-wal")
    with Outbox.open(cfg) as box:
        box.delete(box.append([rec(payload=b"x" * 3000) for _ in range(40)]))
        box._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        # A WAL of pages the file already has (so a checkpoint needs no room), 300+ KB of it.
        while wal.stat().st_size < 300 * KiB:
            box.delete(box.append([rec(payload=b"x" * 3000) for _ in range(20)]))
        before = wal.stat().st_size
        fill_volume(volume / "other")  # another program takes everything left
        assert shutil.disk_usage(volume).free < 4096
        box.append([rec(payload=b"y" * 500)])
        assert wal.stat().st_size < before  # it gave its WAL's space back, then wrote
        assert [s.payload for s in box.pending(10)] == [b"y" * 500]


def test_errors_from_sqlite_never_leak_sqlite3_types(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(OutboxError) as raised:
        Outbox.open(config(tmp_path / "dir.db"))
    assert not isinstance(raised.value, sqlite3.Error)
    box = Outbox.open(config(tmp_path / "o.db"))
    box.close()
    box.close()  # idempotent
    with pytest.raises(OutboxError, match="closed"):
        box.append([rec()])


# -- AsyncOutbox -----------------------------------------------------------------------------


def block_outbox_thread(box: AsyncOutbox) -> tuple[threading.Event, threading.Event]:
    """Occupy the outbox's only thread until the returned gate is set."""
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait()

    assert box._executor is not None
    box._executor.submit(hold)
    entered.wait()
    return entered, gate


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def test_async_group_commit_coalesces_concurrent_appends_into_fewer_transactions(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with AsyncOutbox(config(tmp_path / "o.db")) as box:
            commits = box.stats().commits
            results = await asyncio.gather(
                *(
                    box.append([rec(payload=bytes([i]))] * 3, answered=[(f"f{i}", f"r{i}")])
                    for i in range(50)
                )
            )
            st = box.stats()
            assert st.commits - commits < 50
            assert box.append_groups == st.commits - commits
            flat = [i for ids in results for i in ids]
            assert len(flat) == 150 == len(set(flat))
            stored = await box.pending(1000)
            assert [s.id for s in stored] == sorted(flat)
            by_id = {s.id: s.payload for s in stored}
            for i, ids in enumerate(results):  # each caller got the ids of its own records
                assert [by_id[x] for x in ids] == [bytes([i])] * 3
            assert await box.answered("f49") == "r49"
            assert st.rows == 150  # stats() is the cached snapshot of the last operation

    run(main())


def test_async_appends_arriving_during_a_commit_go_into_the_next_single_transaction(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with AsyncOutbox(config(tmp_path / "o.db")) as box:
            commits = box.stats().commits
            _, gate = block_outbox_thread(box)
            try:
                first = asyncio.create_task(box.append([rec()]))
                await eventually(
                    lambda: box.append_groups == 1, "box.append_groups == 1", every_s=0
                )  # taken, waiting for the thread
                rest = [asyncio.create_task(box.append([rec(), rec()])) for _ in range(20)]
                await eventually(
                    lambda: len(box._appender._queue) == 20,
                    "len(box._appender._queue) == 20",
                    every_s=0,
                )
            finally:
                gate.set()
            ids = [await first, *[await t for t in rest]]
            assert box.append_groups == 2
            assert box.stats().commits - commits == 2
            assert sorted(i for x in ids for i in x) == list(range(1, 42))

    run(main())


def test_async_appends_are_durable_when_the_await_returns(tmp_path: Path) -> None:
    path = tmp_path / "o.db"

    async def main() -> None:
        async with AsyncOutbox(config(path)) as box:
            for n in range(1, 6):
                (rid,) = await box.append([rec(payload=b"d%d" % n)])
                other = sqlite3.connect(path)  # another connection sees it, committed
                try:
                    row = other.execute("SELECT payload FROM records WHERE id = ?", (rid,))
                    assert row.fetchone() == (b"d%d" % n,)
                finally:
                    other.close()

    run(main())


def test_async_deletes_are_batched_and_each_caller_gets_its_own_count(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncOutbox(config(tmp_path / "o.db")) as box:
            ids = await box.append([rec() for _ in range(30)])
            _, gate = block_outbox_thread(box)
            try:
                tasks = [asyncio.create_task(box.delete(ids[0:3]))]
                await eventually(
                    lambda: box.delete_groups == 1, "box.delete_groups == 1", every_s=0
                )  # taken, waiting for the thread
                tasks += [asyncio.create_task(box.delete(ids[i : i + 3])) for i in range(3, 30, 3)]
                tasks.append(asyncio.create_task(box.delete([10_000, ids[3]])))
                await eventually(
                    lambda: len(box._deleter._queue) == 10,
                    "len(box._deleter._queue) == 10",
                    every_s=0,
                )
            finally:
                gate.set()
            counts = [await t for t in tasks]
            assert counts == [3] * 10 + [1]  # 10_000 never existed; ids[3] went in that commit
            assert box.delete_groups == 2
            assert await box.pending(100) == []
            assert box.stats().deleted["result"] == 30
            assert await box.delete([]) == 0

    run(main())


def test_async_commit_in_progress_is_not_cancelled_half_way(tmp_path: Path) -> None:
    path = tmp_path / "o.db"

    async def main() -> None:
        box = AsyncOutbox(config(path))
        await box.open()
        _, gate = block_outbox_thread(box)
        try:
            caller = asyncio.create_task(box.append([rec(payload=b"a")]))
            other = asyncio.create_task(box.append([rec(payload=b"b")]))
            await eventually(lambda: box.append_groups == 1, "box.append_groups == 1", every_s=0)
            caller.cancel()  # e.g. SIGTERM cancels the task that was waiting for its ids
            committer = box._appender._task
            assert committer is not None
            committer.cancel()  # … and the group-commit task itself (loop shutdown)
            await eventually(
                lambda: caller.done() and committer.done(),
                "caller.done() and committer.done()",
                every_s=0,
            )
        finally:
            gate.set()
        assert await other == [2]
        with pytest.raises(asyncio.CancelledError):
            await caller
        await box.aclose()  # waits for the transaction that was running

    run(main())
    with Outbox.open(config(path)) as box:
        assert sorted(s.payload for s in box.pending(10)) == [b"a", b"b"]


def test_async_errors_reach_every_caller_of_the_failed_group_and_the_outbox_recovers(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with AsyncOutbox(config(tmp_path / "o.db", max_bytes=64 * MiB)) as box:
            kept = await box.append([rec("result", b"r" * 6000) for _ in range(20)])
            assert box._outbox is not None
            conn = box._outbox._conn

            def limit_pages() -> None:
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {pages + 2}")

            await box._submit(limit_pages)
            outcomes = await asyncio.gather(
                *(box.append([rec("result", b"n" * 6000)] * 4) for _ in range(5)),
                return_exceptions=True,
            )
            assert all(isinstance(o, StorageFull) for o in outcomes)
            with pytest.raises(ValueError, match="eviction_order"):
                await box.append([rec("nope")])
            assert await box.delete(kept[:10]) == 10
            assert len(await box.append([rec("result", b"n" * 6000)])) == 1
            assert box.stats().rows == 11

    run(main())


def test_async_outbox_is_unusable_after_close(tmp_path: Path) -> None:
    async def main() -> None:
        box = AsyncOutbox(config(tmp_path / "o.db"))
        with pytest.raises(OutboxError):
            box.stats()
        async with box:
            await box.append([rec()])
        await box.aclose()  # idempotent
        with pytest.raises(OutboxError, match="closed"):
            await box.append([rec()])
        assert box.stats().rows == 1

    run(main())


def test_evicted_items_count_what_the_evicted_records_carried(tmp_path: Path) -> None:
    # A results message carries many results: an operator needs the results lost, not rows.
    cfg = config(tmp_path / "o.db", max_bytes=256 * KiB)
    rng = random.Random(7)
    carried: dict[int, int] = {}
    with Outbox.open(cfg) as box:
        for _ in range(400):
            n = rng.randint(1, 50)
            (rid,) = box.append([Record("result", "edge/gw-1/results", b"r" * 900, items=n)])
            carried[rid] = n
        st = box.stats()
        assert st.evicted["result"] > 0
        left = {s.id: s.items for s in box.pending(10**6)}
        assert all(left[i] == carried[i] for i in left)  # items come back as stored
        assert st.evicted_items["result"] == sum(n for i, n in carried.items() if i not in left)
    with Outbox.open(cfg) as box:  # and the count survives a reopen
        assert box.stats().evicted_items == st.evicted_items


def test_a_schema_1_outbox_is_upgraded_in_place_and_keeps_its_records(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    for statement in (
        "CREATE TABLE records(id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,"
        " size INTEGER NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,"
        " created_at REAL NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL)",
        "CREATE INDEX records_by_kind ON records(kind, id)",
        "CREATE TABLE answered(n INTEGER PRIMARY KEY, frame_key TEXT NOT NULL UNIQUE,"
        " result_id TEXT NOT NULL, size INTEGER NOT NULL)",
        "CREATE TABLE counters(kind TEXT PRIMARY KEY, appended INTEGER NOT NULL DEFAULT 0,"
        " deleted INTEGER NOT NULL DEFAULT 0, evicted INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
        "INSERT INTO records(kind, size, qos, retain, created_at, topic, payload)"
        " VALUES ('result', 100, 1, 0, 1.0, 'edge/gw-1/results', x'01')",
        "INSERT INTO counters(kind, appended, evicted) VALUES ('result', 5, 4)",
        f"PRAGMA application_id = {0x45445742}",
        "PRAGMA user_version = 1",
    ):
        conn.execute(statement)
    conn.close()
    with Outbox.open(config(path)) as box:
        (old,) = box.pending(10)
        assert (old.payload, old.items) == (b"\x01", 1)
        assert box.stats().evicted_items["result"] == 4  # one item per record before
        box.append([Record("result", "edge/gw-1/results", b"new", items=3)])
        assert [s.items for s in box.pending(10)] == [1, 3]
    assert integrity(path) == ["ok"]


def test_pending_reads_only_the_kinds_asked_for(tmp_path: Path) -> None:
    box = Outbox.open(OutboxConfig(path=tmp_path / "k.db", synchronous="OFF"))
    try:
        kinds = ["result", "hard_example", "event", "hard_example", "result"]
        ids = box.append([Record(k, f"t/{i}", b"p") for i, k in enumerate(kinds)])
        assert [r.id for r in box.pending(10, kinds={"hard_example"})] == [ids[1], ids[3]]
        assert [r.id for r in box.pending(10, exclude={"hard_example"})] == [
            ids[0], ids[2], ids[4],
        ]  # fmt: skip
        assert [r.id for r in box.pending(10, after_id=ids[1], kinds={"hard_example"})] == [ids[3]]
        assert [r.id for r in box.pending(10)] == ids
    finally:
        box.close()


def test_two_forwarders_protectors_are_both_honoured(tmp_path: Path) -> None:
    async def scenario() -> frozenset[int]:
        cfg = OutboxConfig(path=tmp_path / "p.db", synchronous="OFF")
        async with AsyncOutbox(cfg) as box:
            box.protect(lambda: frozenset({1, 2}))
            box.protect(lambda: frozenset({7}))
            return frozenset(box._protected())

    assert asyncio.run(scenario()) == {1, 2, 7}

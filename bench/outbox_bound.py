"""The outbox's bound at every instant (ADR 0075): ``python -m bench.outbox_bound [--dir DIR]``.

For each case, concurrent callers append one result record each (with its answered key) through
:class:`AsyncOutbox` until four times the bound was appended, with nothing delivered (an
outage), then everything is deleted (the drain: deletes and vacuum). Reports the largest
database + WAL on disk, from the outbox's own peak (taken at each commit and checkpoint) and
from a thread sampling the files every millisecond, as a share of the bound; records/s;
commits and checkpoints. The database lives in ``--dir`` (default: a temporary directory under
the current one, on the disk that matters).

``--per-transaction`` instead measures the CPU time of one transaction at the default bound:
20,000 appends of one record with its answered key, a delete of everything every fourth,
``synchronous = OFF`` (no fsync hides the bookkeeping).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

from edgewise.outbox.async_outbox import AsyncOutbox
from edgewise.outbox.config import OutboxConfig
from edgewise.outbox.record import Record
from edgewise.outbox.store import Outbox

KiB = 1024
MiB = 1024 * KiB
Sync = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
#: (bound, payload bytes, callers)
CASES = [
    (256 * KiB, 600, 64),
    (MiB, 600, 1),
    (MiB, 600, 256),
    (MiB, 6000, 64),
    (MiB, 20_000, 64),
    (4 * MiB, 9000, 64),
    (64 * MiB, 600, 256),
]


def _size(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(f"{path}{suffix}").st_size
    return total


async def run_case(
    directory: Path, bound: int, payload: int, callers: int, synchronous: Sync
) -> dict[str, float]:
    path = directory / f"bound-{bound}-{payload}-{callers}.db"
    rng = random.Random(payload)
    largest = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal largest
        while not stop.is_set():
            largest = max(largest, _size(path))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    async with AsyncOutbox(
        OutboxConfig(path=path, max_bytes=bound, synchronous=synchronous)
    ) as box:
        sampler.start()
        frame = 0
        start = time.perf_counter()

        async def caller() -> None:
            nonlocal frame
            while box.stats().appended_bytes < 4 * bound:
                frame += 1
                size = rng.randint(payload // 2, payload * 3 // 2)
                record = Record("result", "edge/gw-1/results", rng.randbytes(size))
                await box.append([record], [(f"cam-1/{frame}", f"r-{frame:032d}")])

        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.perf_counter() - start
        while batch := await box.pending(256):
            await box.delete(s.id for s in batch)
        stats = box.stats()
    stop.set()
    sampler.join()
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
    return {
        "peak": stats.peak_file_bytes / bound,
        "sampled": largest / bound,
        "records_per_s": frame / elapsed,
        "commits": stats.commits,
        "checkpoints": stats.checkpoints,
    }


def per_transaction(directory: Path, n: int = 20_000) -> None:
    path = directory / "per-transaction.db"
    record = Record("result", "edge/gw-1/results", os.urandom(300))
    with Outbox.open(OutboxConfig(path=path, synchronous="OFF")) as box:
        cpu = time.process_time()
        for i in range(n):
            box.append([record], [(f"cam-1/{i}", f"r-{i:032d}")])
            if i % 4 == 3:
                box.delete(s.id for s in box.pending(64))
        cpu = time.process_time() - cpu
        commits = box.stats().commits
    print(f"{cpu / commits * 1e6:.1f} us of CPU per transaction ({commits:,} transactions)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--synchronous", default="NORMAL", choices=["OFF", "NORMAL", "FULL"])
    parser.add_argument("--per-transaction", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or Path.cwd()) as tmp:
        if args.per_transaction:
            per_transaction(Path(tmp))
            return
        print(
            "| bound | record | callers | peak db+WAL (outbox) | sampled 1 ms | records/s "
            "| commits | checkpoints |"
        )
        print("|--:|--:|--:|--:|--:|--:|--:|--:|")
        for bound, payload, callers in CASES:
            r = asyncio.run(run_case(Path(tmp), bound, payload, callers, args.synchronous))
            print(
                f"| {bound // KiB:,} KiB | {payload:,} B | {callers} | {r['peak']:.1%} "
                f"| {r['sampled']:.1%} | {r['records_per_s']:,.0f} | {r['commits']:,.0f} "
                f"| {r['checkpoints']:,.0f} |"
            )


if __name__ == "__main__":
    main()

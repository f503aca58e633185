"""Append throughput of the outbox: ``python -m bench.outbox_append [--rows N] [--dir DIR]``.

Batched appends of ``Record("result", …, 300-byte payload)`` into a fresh database per case
(default bound, so nothing is evicted), for each synchronous mode and batch size, plus the
same through :class:`AsyncOutbox` with concurrent single-record callers (group commit).
Prints rows/s and commits/s. The database lives in ``--dir`` (default: a temporary directory
under the current one, so it is on the disk that matters, not on a tmpfs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

from edgewise.outbox.async_outbox import AsyncOutbox
from edgewise.outbox.config import OutboxConfig
from edgewise.outbox.record import Record
from edgewise.outbox.store import Outbox

Sync = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


def bench_sync(directory: Path, synchronous: Sync, batch: int, rows: int) -> tuple[float, float]:
    path = directory / f"bench-{synchronous}-{batch}.db"
    records = [Record("result", "edge/gw-1/results", os.urandom(300)) for _ in range(batch)]
    with Outbox.open(OutboxConfig(path=path, synchronous=synchronous)) as box:
        start = time.perf_counter()
        done = 0
        while done < rows:
            box.append(records)
            done += batch
        elapsed = time.perf_counter() - start
        commits = box.stats().commits
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return done / elapsed, commits / elapsed


async def bench_async(
    directory: Path, synchronous: Sync, callers: int, rows: int
) -> tuple[float, float]:
    path = directory / f"bench-async-{synchronous}-{callers}.db"  # removed with the directory
    record = Record("result", "edge/gw-1/results", os.urandom(300))
    async with AsyncOutbox(OutboxConfig(path=path, synchronous=synchronous)) as box:
        per_caller = rows // callers

        async def caller() -> None:
            for _ in range(per_caller):
                await box.append([record])

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.perf_counter() - start
        commits = box.stats().commits
    return per_caller * callers / elapsed, commits / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or Path.cwd()) as tmp:
        directory = Path(tmp)
        print(f"outbox append throughput, 300-byte payloads, db in {directory}")
        print(f"{'mode':<8}{'batch':>7}{'rows/s':>12}{'commits/s':>12}")
        modes: tuple[Sync, ...] = ("NORMAL", "FULL")
        for synchronous in modes:
            for batch in (1, 64, 128, 256):
                rows = args.rows if batch > 1 else min(args.rows, 5_000)
                rate, commits = bench_sync(directory, synchronous, batch, rows)
                print(f"{synchronous:<8}{batch:>7}{rate:>12,.0f}{commits:>12,.0f}")
        print(f"{'mode':<8}{'callers':>7}{'rows/s':>12}{'commits/s':>12}  (AsyncOutbox)")
        for synchronous in modes:
            for callers in (64, 256):
                rate, commits = asyncio.run(
                    bench_async(directory, synchronous, callers, min(args.rows, 50_000))
                )
                print(f"{synchronous:<8}{callers:>7}{rate:>12,.0f}{commits:>12,.0f}")


if __name__ == "__main__":
    main()

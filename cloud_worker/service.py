"""Run a cloud worker until SIGTERM/SIGINT, then finish the work in hand and exit cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from cloud_worker.worker import Worker

log = logging.getLogger(__name__)


async def run_worker(worker: Worker, *, stop: asyncio.Event | None = None) -> int:
    """Serve until ``stop`` is set or a termination signal arrives; return the exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with worker:
        print(f"worker {worker.worker_id} ready on {worker.subscription}", flush=True)
        await stop.wait()
        log.info("stopping: finishing escalations in hand")
        finished = await worker.drain()
        s = worker.stats
        log.info(
            "stopped: %d received, %d answered, %d replies, %d duplicates, %d expired,"
            " %d rejected%s",
            s.received,
            s.answered,
            s.replies,
            s.duplicates,
            s.expired,
            s.rejected,
            "" if finished else " (drain timed out: the rest is handed back)",
        )
    print(
        f"worker {worker.worker_id} stopped: answered={worker.stats.answered}"
        f" replies={worker.stats.replies} cases={worker.stats.cases}"
        f" batches={worker.stats.batches} handled={worker.stats.handled}",
        flush=True,
    )
    return 0

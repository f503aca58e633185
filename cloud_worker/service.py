"""Run a cloud worker until SIGTERM/SIGINT, then finish the work in hand and exit cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Iterator

from cloud_worker.worker import Worker

log = logging.getLogger(__name__)

GC_THRESHOLDS = (500_000, 20, 10)
"""The collector's thresholds while a worker serves (Python's default: 700, 10, 10). A worker
makes ~15 short-lived container objects per case, nearly all freed by reference counting; with
the default the young generation is collected every ~50 cases and the whole heap now and then,
about a fifth of the event loop's CPU. Each young pass scans the objects of every case in
flight (thousands in a flood), so passes are made rare
(docs/adr/0034-worker-pipeline-and-rows.md)."""


@contextlib.contextmanager
def fewer_gc_passes() -> Iterator[None]:
    """Run with :data:`GC_THRESHOLDS`; the previous thresholds are restored after."""
    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def run_worker(worker: Worker, *, stop: asyncio.Event | None = None) -> int:
    """Serve until ``stop`` is set or a termination signal arrives; return the exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    with fewer_gc_passes():
        await _serve(worker, stop)
    print(
        f"worker {worker.worker_id} stopped: answered={worker.stats.answered}"
        f" replies={worker.stats.replies} cases={worker.stats.cases}"
        f" batches={worker.stats.batches} handled={worker.stats.handled}",
        flush=True,
    )
    return 0


async def _started(worker: Worker, stop: asyncio.Event) -> bool:
    """Enter ``worker`` (which waits for its broker, however long), unless ``stop`` comes first:
    True once it has entered."""
    entering = asyncio.ensure_future(worker.__aenter__())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([entering, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if entering.done():
        entering.result()  # its error, if it failed
        return True
    entering.cancel()  # it closes what it had opened
    with contextlib.suppress(asyncio.CancelledError):
        await entering
    return False


async def _serve(worker: Worker, stop: asyncio.Event) -> None:
    if not await _started(worker, stop):
        log.info("stopped before the broker answered")
        return
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_exit(worker)
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

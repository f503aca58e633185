"""Run the bridge until SIGTERM/SIGINT, then drain and exit cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from broker_bridge.bridge import Bridge
from broker_bridge.config import BridgeConfig

log = logging.getLogger(__name__)


async def run_bridge(config: BridgeConfig, *, stop: asyncio.Event | None = None) -> int:
    """Serve until ``stop`` is set or a termination signal arrives; return the exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with Bridge(config) as bridge:
        await stop.wait()
        log.info("stopping: draining the queues (up to %.0f s)", config.drain_timeout_s)
        finished = await bridge.drain()
        t = bridge.telemetry()
        log.info(
            "stopped: up %d delivered, %d queued left; down %d delivered, %d queued left%s",
            t.up.delivered,
            t.up.queue_rows,
            t.down.delivered,
            t.down.queue_rows,
            "" if finished else " (drain timed out; the rest stays queued on disk)",
        )
    return 0

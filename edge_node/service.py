"""Run an edge node until SIGTERM/SIGINT, then drain and exit cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from edge_node.config import NodeConfig
from edge_node.node import EdgeNode

log = logging.getLogger(__name__)


async def run_node(config: NodeConfig, *, stop: asyncio.Event | None = None) -> int:
    """Serve until ``stop`` is set or a termination signal arrives; return the exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not the main thread, or no signals on this platform: the caller sets ``stop``.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with EdgeNode(config) as node:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(
                signal.SIGUSR1, lambda: log.warning("node state: %s", node.describe())
            )
        await stop.wait()
        log.info("stopping: draining in-flight frames (up to %.0f s)", config.drain_timeout_s)
        finished = await node.drain()
        log.info("stopped: %s%s", node.summary(), "" if finished else " (drain timed out)")
    return 0

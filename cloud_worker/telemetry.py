"""A worker's telemetry on ``{cloud_root}/workers/{worker_id}/telemetry``: its counts since
it started, its state and reasons as on its presence (docs/telemetry.md)."""

from __future__ import annotations

import asyncio
import logging
import time

from cloud_worker.presence import Presence
from cloud_worker.stats import WorkerStats
from edgewise.mqtt import MqttSession
from schemas import WorkerTelemetry, encode_worker_telemetry

log = logging.getLogger(__name__)

_COUNTS = (
    "received",
    "cases",
    "answered",
    "replies",
    "verdicts",
    "duplicates",
    "expired",
    "uploads",
    "batches",
    "handled",
    "handler_errors",
    "store_errors",
    "reply_failures",
    "ignored_draining",
)


class TelemetryReporter:
    """Makes and publishes (QoS 0, not retained: the next window says it all again) one
    window at a time."""

    def __init__(
        self, topic: str, stats: WorkerStats, session: MqttSession, presence: Presence
    ) -> None:
        self.topic = topic
        self.stats = stats
        self.session = session
        self.presence = presence
        self.seq = 0
        self.started = self._last = time.monotonic()

    def window(self) -> WorkerTelemetry:
        now = time.monotonic()
        s, session = self.stats, self.session.stats
        counts = {name: getattr(s, name) for name in _COUNTS}
        counts["takeovers"] = session.takeovers
        counts["reconnects"] = session.reconnects
        reasons = self.presence.reasons()
        window = WorkerTelemetry(
            worker=self.presence.worker_id,
            boot_id=self.presence.boot_id,
            seq=self.seq,
            ts=time.time(),
            window_s=now - self._last,
            state="degraded" if reasons else "online",
            reasons=reasons,
            counts=counts,
            rejects=dict(s.rejects),
            failures=dict(s.failures),
            uptime_s=now - self.started,
        )
        self.seq += 1
        self._last = now
        return window

    def publish(self) -> None:
        """One window, if connected (a window not sent is not missed: the counts are totals)."""
        if not self.session.connected:
            return
        payload = encode_worker_telemetry(self.window())
        fut = self.session.publish_nowait(self.topic, payload, qos=0)
        fut.add_done_callback(self._sent)

    def _sent(self, fut: asyncio.Future[None]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            log.debug("telemetry on %s not published: %s", self.topic, exc)

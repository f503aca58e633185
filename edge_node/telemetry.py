"""The telemetry window: every ``telemetry.window_s``, what the node did, through the outbox.

Each window's message (kind ``telemetry``) carries the latency sketch of the results made in it,
the node's counters since start, the outbox's size and evictions and the status. Closing a
window also checks the latency SLO of the hardware class (``latency_slo``) and, since it writes
to the outbox even when no frame comes, whether the disk takes it (``storage_full``,
``storage_error``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from edge_node.deadletter import DeadLetters
from edge_node.escalation import Escalator
from edge_node.hardware import NodeHardware
from edge_node.outbound import Outbound
from edge_node.served import ServedSlot
from edge_node.stats import NodeStats
from edge_node.status import NodeStatus
from edge_node.updates import UpdateManager
from edgewise.mqtt import MqttSession
from edgewise.outbox import Forwarder, Record, StorageFull
from edgewise.telemetry import TelemetryWindow
from schemas import Telemetry, encode_telemetry


class TelemetryReport:
    def __init__(
        self,
        window: TelemetryWindow,
        topic: str,
        *,
        window_s: float,
        hardware: NodeHardware,
        hardware_class: str,
        served: ServedSlot,
        status: NodeStatus,
        stats: NodeStats,
        outbound: Outbound,
        sessions: list[MqttSession],
        connections: Callable[[], list[MqttSession]],
        forwarders: list[Forwarder],
        results_to_uplink: Forwarder,
        end_to_end: bool,
        deadletters: DeadLetters,
        escalator: Escalator | None,
        updates: UpdateManager | None,
        draining: Callable[[], bool],
    ) -> None:
        self.window = window
        self._topic = topic
        self._window_s = window_s
        self._hardware = hardware
        self._hardware_class = hardware_class
        self._served = served
        self._status = status
        self._stats = stats
        self._outbound = outbound
        self._sessions = sessions
        self._connections = connections
        self._forwarders = forwarders
        self._results_to_uplink = results_to_uplink
        self._e2e = end_to_end
        self._deadletters = deadletters
        self._escalator = escalator
        self._updates = updates
        self._draining = draining

    async def run(self) -> None:
        next_at = time.monotonic() + self._window_s
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += self._window_s
            if not self._draining():
                await self.close_window()

    async def close_window(self) -> None:
        """End the current telemetry window: check the latency SLO, store the window's message
        in the outbox (kind ``telemetry``) and hand it to the forwarder."""
        slo_ms = self._hardware.latency_slo_p99_ms
        if slo_ms > 0:
            p99 = self.window.sketch.quantile(0.99)
            self._status.set("latency_slo", p99 is not None and p99 > slo_ms)
        payload = encode_telemetry(self._message())
        self._stats.telemetry_windows += 1
        failed = await self._outbound.send(Record("telemetry", self._topic, payload))
        if failed is not None:  # a full disk shows here even when no frame comes
            reason = "storage_full" if isinstance(failed, StorageFull) else "storage_error"
            self._status.set(reason, True)
            return
        self._status.set("storage_full", False)
        self._status.set("storage_error", False)

    def _message(self) -> Telemetry:
        stats = self._stats
        st = self._outbound.outbox.stats()
        reconnects = sum(s.stats.reconnects for s in self._sessions)
        connections = self._connections()
        m = self._served.model
        return self.window.build(
            time.time(),
            counts_total={
                "frames": stats.frames_in,
                "results": stats.results_out,
                "results_stored": stats.results_stored,
                "rejected": stats.rejected,
                "already_answered": stats.frames_already_answered,
                "deadletters": self._deadletters.published,
                "deadletters_suppressed": self._deadletters.suppressed,
                "inference_errors": stats.inference_errors,
                "publish_failures": stats.publish_failures,
                "reconnects": reconnects,
                "takeovers": sum(s.stats.takeovers for s in connections),
                "bytes_received": sum(s.bytes_received for s in connections),
                "frames_left_to_other": stats.frames_left_to_other,
                **self._update_counts(),
                "session_recycles": stats.session_recycles,
                "uplink_published": sum(f.stats.published for f in self._forwarders),
                "uplink_delivered": sum(f.stats.delivered for f in self._forwarders),
                **self._end_to_end_counts(),
                **self._escalation_counts(),
            },
            rejects_total=dict(stats.rejects),
            evictions=dict(st.evicted_items),  # hard examples included (ADR 0069)
            outbox_rows=st.rows,
            outbox_bytes=st.file_bytes,
            state=self._status.state,
            reasons=self._status.reasons,
            model=m.name,
            release=m.release,
            runtime=m.runtime.name,
            provider=m.runtime.provider,
            hardware_class=self._hardware_class,
        )

    def _update_counts(self) -> dict[str, int]:
        u = self._updates
        if u is None:
            return {}
        return {
            "control_rejects": u.rejects.total,
            "control_rejects_unreported": u.rejects.suppressed,
            "commands_run": u.stats.commands_run,
        }

    def _end_to_end_counts(self) -> dict[str, int]:
        if not self._e2e:
            return {}
        f = self._results_to_uplink.stats
        return {
            "acks_received": self._stats.acks_received,
            "acks_rejected": self._stats.acks_rejected,
            "results_confirmed": f.confirmed,
            "results_resent": f.resent,
            "results_unconfirmed_evicted": f.unconfirmed_evicted,
            "confirmations_unknown": f.confirmations_unknown,
        }

    def _escalation_counts(self) -> dict[str, int]:
        esc = self._escalator.stats if self._escalator is not None else None
        if esc is None:
            return {}
        return {
            "escalations": esc.escalated,
            "cloud": esc.cloud,
            "cloud_cached": esc.cached,
            "edge_fallback": esc.fallback,
            "edge_offline": esc.offline,
            "late_replies": esc.late_replies,
            "edge_fallback_cloud_unavailable": esc.unavailable_fallback,
            "cloud_unavailable_episodes": esc.unavailable_episodes,
            "cloud_probes": esc.probes,
        }

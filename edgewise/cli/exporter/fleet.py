"""What the exporter knows about the fleet, built from untrusted messages (pure: topic, bytes
and the receive time in; no sockets, no clock of its own).

Node counters are sums of the telemetry windows' deltas, each window counted once (the outbox
delivers at least once: a window id seen again is skipped). Quantiles come from each node's
latest window while it is fresh, and the fleet's from the merged sketches of those windows
(ADR 0040). An empty retained status (``edgewise fleet forget``) drops every series of its
source. Every message that breaks the contract is counted by kind and reason; none raises.
Memory is bounded: at most ``max_sources`` nodes, workers and bridges each, and a bounded
memory of window and event ids per node.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from broker_bridge.wire import BridgeTelemetry
from broker_bridge.wire import decode_telemetry as decode_bridge_telemetry
from edgewise.cli.fleet_view import newer_window
from edgewise.releases import decode_event
from edgewise.telemetry import BadSketch, LatencySketch, merged
from schemas import (
    ContractError,
    Limits,
    Status,
    Telemetry,
    Topics,
    WorkerTelemetry,
    decode_status,
    decode_telemetry,
    decode_worker_telemetry,
    validate_level,
)

IDS_REMEMBERED: Final = 512
"""Window and event ids remembered per node to skip copies delivered again."""
RECENT_WINDOWS: Final = 64
"""Sketches of a node's most recent windows kept for its quantiles (the newest, within
``max_age_s``)."""


class _Seen:
    """A bounded set of recent ids (oldest forgotten first)."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> bool:
        """Remember ``key``; False if it was already there."""
        if key in self._ids:
            return False
        self._ids[key] = None
        if len(self._ids) > IDS_REMEMBERED:
            self._ids.popitem(last=False)
        return True


@dataclass(slots=True)
class NodeMetrics:
    node: str
    status: Status | None = None
    window: Telemetry | None = None
    """The latest window (by boot and seq), for the gauges."""
    recent: deque[tuple[float, LatencySketch]] = field(
        default_factory=lambda: deque(maxlen=RECENT_WINDOWS)
    )
    """(received at, sketch) of the windows received most recently, for the quantiles."""
    counts: Counter[str] = field(default_factory=Counter)
    rejects: Counter[str] = field(default_factory=Counter)
    latency_count: int = 0
    latency_sum_ms: float = 0.0
    update_events: Counter[str] = field(default_factory=Counter)
    update_state: dict[str, str] = field(default_factory=dict)
    """model -> kind of its latest update event."""
    model_release: dict[str, int] = field(default_factory=dict)
    last_event_ts: dict[str, float] = field(default_factory=dict)
    windows: _Seen = field(default_factory=_Seen)
    events: _Seen = field(default_factory=_Seen)

    def fresh_sketch(self, now: float, max_age_s: float) -> LatencySketch | None:
        """The merged sketch of the windows received within ``max_age_s`` (None if none)."""
        fresh = [s for t, s in self.recent if now - t <= max_age_s]
        return merged(fresh) if fresh else None


@dataclass(slots=True)
class WorkerMetrics:
    worker: str
    status: Status | None = None
    telemetry: WorkerTelemetry | None = None
    """The latest window: its counts are totals since the worker's boot."""


@dataclass(slots=True)
class BridgeMetrics:
    bridge: str
    status: Status | None = None
    telemetry: BridgeTelemetry | None = None


@dataclass
class FleetMetrics:
    topics: Topics = field(default_factory=Topics)
    bridge_root: str = "bridges"
    limits: Limits = field(default_factory=Limits)
    max_sources: int = 100_000
    max_age_s: float = 60.0
    """Quantiles are those of the windows received in the last ``max_age_s`` (merged)."""
    nodes: dict[str, NodeMetrics] = field(default_factory=dict)
    workers: dict[str, WorkerMetrics] = field(default_factory=dict)
    bridges: dict[str, BridgeMetrics] = field(default_factory=dict)
    messages: Counter[str] = field(default_factory=Counter)
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)
    duplicate_windows: int = 0
    forgotten: int = 0

    # -- subscriptions ------------------------------------------------------------------------

    def filters(self) -> list[str]:
        """The topic filters the exporter subscribes to."""
        edge, cloud = self.topics.edge_root, self.topics.cloud_root
        return [
            f"{edge}/+/status",
            f"{edge}/+/telemetry",
            f"{edge}/+/events",
            f"{cloud}/workers/+/status",
            f"{cloud}/workers/+/telemetry",
            f"{self.bridge_root}/+/status",
            f"{self.bridge_root}/+/telemetry",
        ]

    def ingest(self, topic: str, payload: bytes, now: float) -> None:
        """Take one message; ``now`` is the receive time (any monotonic clock, seconds)."""
        kind, name = self._route(topic)
        if kind is None:
            self._reject("topic", "unexpected")
            return
        try:
            validate_level(name)
        except ContractError as exc:
            self._reject(kind, exc.reason)
            return
        self.messages[kind] += 1
        handler = {
            "node_status": self._node_status,
            "node_telemetry": self._node_telemetry,
            "node_events": self._node_event,
            "worker_status": self._worker_status,
            "worker_telemetry": self._worker_telemetry,
            "bridge_status": self._bridge_status,
            "bridge_telemetry": self._bridge_telemetry,
        }[kind]
        handler(name, bytes(payload), now)

    def _route(self, topic: str) -> tuple[str | None, str]:
        for root, prefix, kinds in (
            (self.topics.edge_root, "node", ("status", "telemetry", "events")),
            (f"{self.topics.cloud_root}/workers", "worker", ("status", "telemetry")),
            (self.bridge_root, "bridge", ("status", "telemetry")),
        ):
            if topic.startswith(root + "/"):
                rest = topic[len(root) + 1 :].split("/")
                if len(rest) == 2 and rest[1] in kinds:
                    return f"{prefix}_{rest[1]}", rest[0]
        return None, ""

    def _reject(self, kind: str, reason: str) -> None:
        self.rejected[(kind, reason)] += 1

    def _room(self, table: Mapping[str, object], name: str, kind: str) -> bool:
        if name in table or len(table) < self.max_sources:
            return True
        self._reject(kind, "too_many_sources")
        return False

    # -- nodes ---------------------------------------------------------------------------------

    def _node_status(self, name: str, payload: bytes, now: float) -> None:
        if not payload:  # an empty retained message deletes the status: the node is forgotten
            if self.nodes.pop(name, None) is not None:
                self.forgotten += 1
            return
        try:
            status = decode_status(payload, self.limits)
        except ContractError as exc:
            self._reject("node_status", exc.reason)
            return
        if status.node != name:
            self._reject("node_status", "node_mismatch")
            return
        if not self._room(self.nodes, name, "node_status"):
            return
        node = self.nodes.setdefault(name, NodeMetrics(name))
        if node.status is None or status.ts >= node.status.ts:
            node.status = status

    def _node_telemetry(self, name: str, payload: bytes, now: float) -> None:
        try:
            window = decode_telemetry(payload, self.limits)
            sketch = LatencySketch.from_bytes(window.latency, limits=self.limits)
        except (ContractError, BadSketch) as exc:
            self._reject("node_telemetry", exc.reason)
            return
        if window.node != name:
            self._reject("node_telemetry", "node_mismatch")
            return
        if not self._room(self.nodes, name, "node_telemetry"):
            return
        node = self.nodes.setdefault(name, NodeMetrics(name))
        if not node.windows.add(window.id):
            self.duplicate_windows += 1
            return
        node.counts.update(window.counts)
        node.rejects.update(window.rejects)
        node.latency_count += window.latency_count
        node.latency_sum_ms += sketch.sum
        node.recent.append((now, sketch))
        if newer_window(window, node.window):
            node.window = window

    def _node_event(self, name: str, payload: bytes, now: float) -> None:
        try:
            event = decode_event(payload)
        except ContractError as exc:
            self._reject("node_events", exc.reason)
            return
        if event.node != name:
            self._reject("node_events", "node_mismatch")
            return
        if not self._room(self.nodes, name, "node_events"):
            return
        node = self.nodes.setdefault(name, NodeMetrics(name))
        if not node.events.add(event.id):
            return
        node.update_events[event.kind] += 1
        if event.model is None:
            return
        if event.ts >= node.last_event_ts.get(event.model, float("-inf")):
            node.last_event_ts[event.model] = event.ts
            node.update_state[event.model] = event.kind
            if event.running_release is not None:
                node.model_release[event.model] = event.running_release

    # -- workers and bridges -------------------------------------------------------------------

    def _worker_status(self, name: str, payload: bytes, now: float) -> None:
        if not payload:
            if self.workers.pop(name, None) is not None:
                self.forgotten += 1
            return
        try:
            status = decode_status(payload, self.limits)
        except ContractError as exc:
            self._reject("worker_status", exc.reason)
            return
        if status.node != name:
            self._reject("worker_status", "worker_mismatch")
            return
        if not self._room(self.workers, name, "worker_status"):
            return
        worker = self.workers.setdefault(name, WorkerMetrics(name))
        if worker.status is None or status.ts >= worker.status.ts:
            worker.status = status

    def _worker_telemetry(self, name: str, payload: bytes, now: float) -> None:
        try:
            t = decode_worker_telemetry(payload, self.limits)
        except ContractError as exc:
            self._reject("worker_telemetry", exc.reason)
            return
        if t.worker != name:
            self._reject("worker_telemetry", "worker_mismatch")
            return
        if not self._room(self.workers, name, "worker_telemetry"):
            return
        worker = self.workers.setdefault(name, WorkerMetrics(name))
        old = worker.telemetry
        if old is None or (t.seq > old.seq if t.boot_id == old.boot_id else t.ts > old.ts):
            worker.telemetry = t

    def _bridge_status(self, name: str, payload: bytes, now: float) -> None:
        if not payload:
            if self.bridges.pop(name, None) is not None:
                self.forgotten += 1
            return
        try:
            status = decode_status(payload, self.limits)
        except ContractError as exc:
            self._reject("bridge_status", exc.reason)
            return
        if status.node != name:
            self._reject("bridge_status", "bridge_mismatch")
            return
        if not self._room(self.bridges, name, "bridge_status"):
            return
        bridge = self.bridges.setdefault(name, BridgeMetrics(name))
        if bridge.status is None or status.ts >= bridge.status.ts:
            bridge.status = status

    def _bridge_telemetry(self, name: str, payload: bytes, now: float) -> None:
        try:
            t = decode_bridge_telemetry(payload, self.limits)
        except ContractError as exc:
            self._reject("bridge_telemetry", exc.reason)
            return
        if t.bridge != name:
            self._reject("bridge_telemetry", "bridge_mismatch")
            return
        if not self._room(self.bridges, name, "bridge_telemetry"):
            return
        bridge = self.bridges.setdefault(name, BridgeMetrics(name))
        old = bridge.telemetry
        if old is None or t.ts >= old.ts:
            bridge.telemetry = t

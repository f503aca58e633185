"""What ``edgewise fleet status`` knows about the fleet: the latest status and telemetry window
of every node, built from untrusted messages (pure: topic and bytes in, a report out).

A telemetry window replaces a node's current one only if it is newer: within one boot by
``seq`` (clock jumps do not matter), across boots by ``ts``. A backlog the node's outbox
forwards after an outage therefore never hides the live window. Every message that breaks the
contract is counted by kind and reason; none raises.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from edgewise.telemetry import BadSketch, LatencySketch, merged
from schemas import (
    ContractError,
    Limits,
    Status,
    Telemetry,
    Topics,
    decode_status,
    decode_telemetry,
    validate_level,
)


@dataclass(slots=True)
class NodeState:
    node: str
    status: Status | None = None
    telemetry: Telemetry | None = None
    sketch: LatencySketch | None = None


def newer_window(new: Telemetry, old: Telemetry | None) -> bool:
    """Whether ``new`` is a later window than ``old`` of the same node."""
    if old is None:
        return True
    if new.boot_id == old.boot_id:
        return new.seq > old.seq
    return new.ts > old.ts


@dataclass
class FleetView:
    topics: Topics = field(default_factory=Topics)
    limits: Limits = field(default_factory=Limits)
    nodes: dict[str, NodeState] = field(default_factory=dict)
    malformed: Counter[str] = field(default_factory=Counter)
    """Refused messages by ``"{kind}: {reason}"``."""
    stale: int = 0
    """Telemetry windows older than the node's current one (a forwarded backlog)."""

    def ingest(self, topic: str, payload: bytes) -> None:
        """Take one message from ``{edge_root}/+/status`` or ``{edge_root}/+/telemetry``."""
        prefix = self.topics.edge_root + "/"
        rest = topic[len(prefix) :].split("/") if topic.startswith(prefix) else []
        if len(rest) != 2 or rest[1] not in ("status", "telemetry"):
            self.malformed["topic: unexpected"] += 1
            return
        name, kind = rest
        try:
            validate_level(name)
        except ContractError as exc:
            self.malformed[f"{kind}: {exc.reason}"] += 1
            return
        if kind == "status":
            if payload:  # an empty retained message is a deletion, not a status
                self._status(name, payload)
        else:
            self._telemetry(name, payload)

    def _node(self, name: str) -> NodeState:
        return self.nodes.setdefault(name, NodeState(name))

    def _status(self, name: str, payload: bytes) -> None:
        try:
            status = decode_status(payload, self.limits)
        except ContractError as exc:
            self.malformed[f"status: {exc.reason}"] += 1
            return
        if status.node != name:
            self.malformed["status: node_mismatch"] += 1
            return
        node = self._node(name)
        if node.status is None or status.ts >= node.status.ts:
            node.status = status

    def _telemetry(self, name: str, payload: bytes) -> None:
        try:
            window = decode_telemetry(payload, self.limits)
            sketch = LatencySketch.from_bytes(window.latency, limits=self.limits)
        except (ContractError, BadSketch) as exc:
            self.malformed[f"telemetry: {exc.reason}"] += 1
            return
        if window.node != name:
            self.malformed["telemetry: node_mismatch"] += 1
            return
        node = self._node(name)
        if newer_window(window, node.telemetry):
            node.telemetry, node.sketch = window, sketch
        elif node.telemetry is not None and window.id != node.telemetry.id:
            self.stale += 1

    def report(self, now: float) -> dict[str, Any]:
        """Plain data (JSON-ready) for every node and the fleet; ``now`` is epoch s."""
        rows = [_row(n, now) for _, n in sorted(self.nodes.items())]
        sketches = [n.sketch for n in self.nodes.values() if n.sketch is not None]
        fleet = merged(sketches)
        rates = [r["frames_per_s"] for r in rows if r["frames_per_s"] is not None]
        return {
            "nodes": rows,
            "fleet": {
                "nodes": len(rows),
                "nodes_with_telemetry": len(sketches),
                "latency_count": fleet.count,
                "p50_ms": fleet.quantile(0.5),
                "p99_ms": fleet.quantile(0.99),
                "frames_per_s": sum(rates) if rates else None,
            },
            "malformed": sum(self.malformed.values()),
            "malformed_by_reason": dict(sorted(self.malformed.items())),
            "stale_windows": self.stale,
        }


def _row(n: NodeState, now: float) -> dict[str, Any]:
    t, s = n.telemetry, n.status
    frames = t.counts.get("frames", 0) if t else 0
    escalations = t.counts.get("escalations", 0) if t else 0
    seen = [x.ts for x in (t, s) if x is not None]
    state = s.state if s is not None else (t.state if t is not None else None)
    reasons = list(s.reasons if s is not None else (t.reasons if t is not None else []))
    return {
        "node": n.node,
        "state": state,
        "reasons": reasons,
        "model": (t.model if t else None) or (s.model if s else None),
        "release": t.release if t and t.release is not None else (s.release if s else None),
        "hardware_class": t.hardware_class if t else None,
        "runtime": t.runtime if t else None,
        "provider": t.provider if t else None,
        "p50_ms": n.sketch.quantile(0.5) if n.sketch else None,
        "p99_ms": n.sketch.quantile(0.99) if n.sketch else None,
        "latency_count": n.sketch.count if n.sketch else None,
        "frames": frames if t else None,
        "window_s": t.window_s if t else None,
        "frames_per_s": frames / t.window_s if t and t.window_s > 0 else None,
        "escalation_rate": escalations / frames if t and frames else None,
        "outbox_rows": t.outbox_rows if t else None,
        "outbox_bytes": t.outbox_bytes if t else None,
        "evictions": sum(t.evictions.values()) if t else None,
        "evictions_by_kind": dict(t.evictions) if t else {},
        "rejects": dict(t.rejects) if t else {},
        "cpu_temp_c": t.cpu_temp_c if t else None,
        "rss_bytes": t.rss_bytes if t else None,
        "boot_id": t.boot_id if t else (s.boot_id if s else None),
        "seq": t.seq if t else None,
        "last_seen_ts": max(seen) if seen else None,
        "last_seen_s": max(0.0, now - max(seen)) if seen else None,
    }

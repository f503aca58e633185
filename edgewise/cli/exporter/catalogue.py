"""Every metric the exporter serves, in Prometheus' conventions: base units (seconds, bytes),
``_total`` for counters, ``_info`` for labels-only series, one ``node`` / ``worker`` / ``bridge``
label naming the source. Model, release and hardware class are labels of
``edgewise_node_info`` (join on ``node``), so a model update does not start new series of every
counter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Kind = Literal["gauge", "counter", "summary", "info"]


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    """Without the ``_total`` / ``_info`` suffix the client library adds."""
    kind: Kind
    labels: tuple[str, ...]
    help: str

    @property
    def exposed(self) -> tuple[str, ...]:
        """The series names a scrape shows for it."""
        if self.kind == "counter":
            return (f"{self.name}_total",)
        if self.kind == "info":
            return (f"{self.name}_info",)
        if self.kind == "summary":
            return (self.name, f"{self.name}_count", f"{self.name}_sum")
        return (self.name,)


N = ("node",)

#: The counts of a node's telemetry window exported as their own counters (the rest go to
#: ``edgewise_node_count_total{name=...}``).
NODE_COUNTERS: Final = {
    "frames": "Frames received.",
    "results": "Results stored durably.",
    "rejected": "Frames refused (see edgewise_node_rejects_total for the reasons).",
    "deadletters": "Messages dead-lettered.",
    "escalations": "Cases sent to the cloud workers.",
    "cloud_replies": "Verdicts received from the cloud workers.",
    "fallbacks": "Cases decided at the edge after escalating.",
    "reconnects": "Reconnections to the broker.",
    "published": "Messages the broker acknowledged.",
}

#: Verdict sources of escalated cases (telemetry counts of the same names).
ESCALATION_SOURCES: Final = ("cloud", "cloud_cached", "edge_fallback", "edge_offline")

NODE: Final = (
    Metric(
        "edgewise_node_up",
        "gauge",
        N,
        "1 if the node's retained status says online or degraded, 0 if offline.",
    ),
    Metric(
        "edgewise_node_degraded",
        "gauge",
        ("node", "reason"),
        "1 for each reason the node says it is degraded (its retained status).",
    ),
    Metric(
        "edgewise_node",
        "info",
        ("node", "model", "release", "hardware_class", "runtime", "provider"),
        "What serves on the node (its retained status and telemetry).",
    ),
    Metric(
        "edgewise_node_last_seen_timestamp_seconds",
        "gauge",
        N,
        "When the node last published a status or telemetry window (its clock).",
    ),
    *(Metric(f"edgewise_node_{k}", "counter", N, v) for k, v in NODE_COUNTERS.items()),
    Metric(
        "edgewise_node_count",
        "counter",
        ("node", "name"),
        "Every other count of the node's telemetry windows, by name (docs/telemetry.md).",
    ),
    Metric(
        "edgewise_node_rejects",
        "counter",
        ("node", "reason"),
        "Frames and messages refused (dead-lettered), by reason.",
    ),
    Metric(
        "edgewise_node_escalation_verdicts",
        "counter",
        ("node", "source"),
        "Verdicts of escalated cases, by where they came from.",
    ),
    Metric("edgewise_node_outbox_records", "gauge", N, "Records waiting in the node's outbox."),
    Metric("edgewise_node_outbox_bytes", "gauge", N, "Bytes waiting in the node's outbox."),
    Metric(
        "edgewise_node_outbox_evictions",
        "counter",
        ("node", "kind"),
        "Records evicted from a full outbox since it was created, by kind.",
    ),
    Metric(
        "edgewise_node_latency_seconds",
        "summary",
        N,
        "Frame latency (receive to durable "
        "result): quantiles over the windows of the last --max-age seconds (merged "
        "sketches); count and sum over all windows.",
    ),
    Metric(
        "edgewise_node_resident_memory_bytes", "gauge", N, "Resident memory of the node process."
    ),
    Metric(
        "edgewise_node_cpu_temperature_celsius",
        "gauge",
        N,
        "CPU temperature, where the OS exposes one.",
    ),
    Metric("edgewise_node_uptime_seconds", "gauge", N, "Seconds since the node process started."),
    Metric(
        "edgewise_node_update_events",
        "counter",
        ("node", "kind"),
        "Model update events (docs/model-updates.md), by kind.",
    ),
    Metric(
        "edgewise_node_update_state",
        "gauge",
        ("node", "model", "state"),
        "1 for the kind of the latest update event of each model on the node.",
    ),
    Metric(
        "edgewise_node_model_release",
        "gauge",
        ("node", "model"),
        "The release the node serves after its latest update event of that model.",
    ),
)

FLEET: Final = (
    Metric(
        "edgewise_fleet_latency_seconds",
        "summary",
        (),
        "Fleet-wide frame latency: "
        "quantiles of the merged sketches of every node's windows of the last --max-age "
        "seconds (not an average of quantiles).",
    ),
    Metric(
        "edgewise_fleet_nodes", "gauge", ("state",), "Nodes by the state of their retained status."
    ),
)

WORKER: Final = (
    Metric(
        "edgewise_worker_up",
        "gauge",
        ("worker",),
        "1 if the worker's presence says online or degraded.",
    ),
    Metric(
        "edgewise_worker_count",
        "counter",
        ("worker", "name"),
        "The counts of the worker's telemetry (cases, answered, replies, handler_errors, "
        "takeovers, ...): its totals since it started.",
    ),
    Metric(
        "edgewise_worker_rejects",
        "counter",
        ("worker", "reason"),
        "Escalation messages the worker refused, by reason, since it started.",
    ),
    Metric(
        "edgewise_worker_failures",
        "counter",
        ("worker", "stage"),
        "Unexpected failures, by the stage they stopped, since the worker started.",
    ),
    Metric(
        "edgewise_worker_uptime_seconds", "gauge", ("worker",), "Seconds since the worker started."
    ),
    Metric(
        "edgewise_worker_degraded",
        "gauge",
        ("worker", "reason"),
        "1 for each reason the worker says it is degraded.",
    ),
)

B = ("bridge", "direction")
BRIDGE: Final = (
    Metric(
        "edgewise_bridge_up",
        "gauge",
        ("bridge",),
        "1 if the bridge's retained status says online or degraded.",
    ),
    Metric(
        "edgewise_bridge_degraded",
        "gauge",
        ("bridge", "reason"),
        "1 for each reason the bridge says it is degraded.",
    ),
    Metric("edgewise_bridge_received", "counter", B, "Messages taken from the source broker."),
    Metric("edgewise_bridge_delivered", "counter", B, "Messages the far broker acknowledged."),
    Metric("edgewise_bridge_refused", "counter", B, "Messages the far broker refused."),
    Metric("edgewise_bridge_evicted", "counter", B, "Messages evicted from the full queue."),
    Metric(
        "edgewise_bridge_dropped",
        "counter",
        ("bridge", "direction", "reason"),
        "Messages not forwarded: echo, oversize, unmatched, failed.",
    ),
    Metric("edgewise_bridge_queue_records", "gauge", B, "Messages waiting in the queue."),
    Metric("edgewise_bridge_queue_bytes", "gauge", B, "Bytes waiting in the queue."),
    Metric("edgewise_bridge_queue_max_bytes", "gauge", B, "The queue's byte bound."),
    Metric("edgewise_bridge_in_flight", "gauge", B, "Messages sent, not yet acknowledged."),
)

EXPORTER: Final = (
    Metric(
        "edgewise_exporter_connected",
        "gauge",
        (),
        "1 while the exporter is connected to its broker.",
    ),
    Metric("edgewise_exporter_messages", "counter", ("kind",), "Messages taken, by kind."),
    Metric(
        "edgewise_exporter_rejected",
        "counter",
        ("kind", "reason"),
        "Messages refused (size, encoding, schema), by kind and reason.",
    ),
    Metric(
        "edgewise_exporter_duplicate_windows",
        "counter",
        (),
        "Telemetry windows received again (at-least-once delivery) and not counted twice.",
    ),
    Metric(
        "edgewise_exporter_forgotten",
        "counter",
        (),
        "Nodes, workers and bridges dropped "
        "because their retained status was cleared (edgewise fleet forget).",
    ),
)

METRICS: Final = (*NODE, *FLEET, *WORKER, *BRIDGE, *EXPORTER)
BY_NAME: Final = {m.name: m for m in METRICS}

#: The quantiles of the latency summaries.
QUANTILES: Final = (0.5, 0.9, 0.99)

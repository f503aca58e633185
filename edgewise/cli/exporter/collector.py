"""The fleet's state as Prometheus metric families, built at scrape time (a custom collector
of prometheus-client: nothing is kept twice, and a forgotten source is simply not yielded)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from edgewise.cli.exporter.catalogue import BY_NAME, ESCALATION_SOURCES, NODE_COUNTERS, QUANTILES
from edgewise.telemetry import merged

if TYPE_CHECKING:
    from edgewise.cli.exporter.fleet import BridgeMetrics, FleetMetrics, NodeMetrics, WorkerMetrics
    from edgewise.telemetry import LatencySketch


def seconds(ms: float) -> float:
    """Sketches hold milliseconds; Prometheus wants seconds."""
    return ms / 1000.0


class _Families:
    """One metric family per catalogue entry, filled by :meth:`add`."""

    def __init__(self) -> None:
        self.by_name: dict[str, Metric] = {}
        for m in BY_NAME.values():
            labels = list(m.labels)
            fam: Metric
            if m.kind == "gauge":
                fam = GaugeMetricFamily(m.name, m.help, labels=labels)
            elif m.kind == "counter":
                fam = CounterMetricFamily(m.name, m.help, labels=labels)
            elif m.kind == "summary":
                fam = SummaryMetricFamily(m.name, m.help, labels=labels)
            else:
                fam = InfoMetricFamily(m.name, m.help, labels=labels[:1])
            self.by_name[m.name] = fam

    def add(self, name: str, labels: Sequence[str], value: float) -> None:
        fam = self.by_name[name]
        assert isinstance(fam, GaugeMetricFamily | CounterMetricFamily)
        fam.add_metric(list(labels), value)

    def info(self, name: str, labels: Sequence[str], values: dict[str, str]) -> None:
        fam = self.by_name[name]
        assert isinstance(fam, InfoMetricFamily)
        fam.add_metric(list(labels), values)

    def summary(
        self, name: str, labels: Sequence[str], sketch: LatencySketch | None, count: int,
        sum_s: float,
    ) -> None:  # fmt: skip
        fam = self.by_name[name]
        assert isinstance(fam, SummaryMetricFamily)
        keys = BY_NAME[name].labels
        if sketch is not None:
            for q in QUANTILES:
                v = sketch.quantile(q)
                if v is not None:
                    tags = {**dict(zip(keys, labels, strict=True)), "quantile": str(q)}
                    fam.samples.append(Sample(name, tags, seconds(v)))
        fam.add_metric(list(labels), count, sum_s)


class FleetCollector(Collector):
    """Yields the metrics of :mod:`.catalogue` from a :class:`FleetMetrics`, read under
    ``lock`` (which the MQTT side holds while it ingests)."""

    def __init__(
        self,
        fleet: FleetMetrics,
        lock: threading.Lock,
        *,
        connected: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fleet = fleet
        self.lock = lock
        self.connected = connected
        self.clock = clock

    def describe(self) -> Iterable[Metric]:
        return []  # families are built per scrape

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            families = self.build(self.clock())
        yield from families.by_name.values()

    def build(self, now: float) -> _Families:
        f = _Families()
        fleet = self.fleet
        states: Counter[str] = Counter()
        fresh: list[LatencySketch] = []
        for name, node in sorted(fleet.nodes.items()):
            sketch = node.fresh_sketch(now, fleet.max_age_s)
            if sketch is not None:
                fresh.append(sketch)
            if node.status is not None:
                states[node.status.state] += 1
            _node(f, name, node, sketch)
        whole = merged(fresh)
        f.summary("edgewise_fleet_latency_seconds", [], whole, whole.count, seconds(whole.sum))
        for state in ("online", "degraded", "offline"):
            f.add("edgewise_fleet_nodes", [state], states[state])
        for name, worker in sorted(fleet.workers.items()):
            _worker(f, name, worker)
        for name, bridge in sorted(fleet.bridges.items()):
            _bridge(f, name, bridge)
        f.add("edgewise_exporter_connected", [], self.connected())
        for kind, n in sorted(fleet.messages.items()):
            f.add("edgewise_exporter_messages", [kind], n)
        for (kind, reason), n in sorted(fleet.rejected.items()):
            f.add("edgewise_exporter_rejected", [kind, reason], n)
        f.add("edgewise_exporter_duplicate_windows", [], fleet.duplicate_windows)
        f.add("edgewise_exporter_forgotten", [], fleet.forgotten)
        return f


def _node(f: _Families, name: str, node: NodeMetrics, sketch: LatencySketch | None) -> None:
    s, w = node.status, node.window
    state = s.state if s is not None else (w.state if w is not None else None)
    reasons = s.reasons if s is not None else (w.reasons if w is not None else [])
    if state is not None:
        f.add("edgewise_node_up", [name], state != "offline")
    for r in reasons:
        f.add("edgewise_node_degraded", [name, r], 1)
    latest = [x for x in (s, w) if x is not None]
    if latest:
        f.add("edgewise_node_last_seen_timestamp_seconds", [name], max(x.ts for x in latest))
        info = {
            "model": (w.model if w else None) or (s.model if s else None) or "",
            "release": str(next((x.release for x in (w, s) if x and x.release is not None), "")),
            "hardware_class": (w.hardware_class if w else None)
            or (s.hardware_class if s else None)
            or "",
            "runtime": (w.runtime if w else None) or (s.runtime if s else None) or "",
            "provider": (w.provider if w else None) or (s.provider if s else None) or "",
        }
        f.info("edgewise_node", [name], info)
    for key in NODE_COUNTERS:
        f.add(f"edgewise_node_{key}", [name], node.counts.get(key, 0))
    for key, n in sorted(node.counts.items()):
        if key not in NODE_COUNTERS:
            f.add("edgewise_node_count", [name, key], n)
    for reason, n in sorted(node.rejects.items()):
        f.add("edgewise_node_rejects", [name, reason], n)
    for source in ESCALATION_SOURCES:
        if source in node.counts:
            f.add("edgewise_node_escalation_verdicts", [name, source], node.counts[source])
    f.summary(
        "edgewise_node_latency_seconds", [name], sketch, node.latency_count,
        seconds(node.latency_sum_ms),
    )  # fmt: skip
    if w is not None:
        f.add("edgewise_node_outbox_records", [name], w.outbox_rows)
        f.add("edgewise_node_outbox_bytes", [name], w.outbox_bytes)
        for kind, n in sorted(w.evictions.items()):
            f.add("edgewise_node_outbox_evictions", [name, kind], n)
        if w.rss_bytes is not None:
            f.add("edgewise_node_resident_memory_bytes", [name], w.rss_bytes)
        if w.cpu_temp_c is not None:
            f.add("edgewise_node_cpu_temperature_celsius", [name], w.cpu_temp_c)
        f.add("edgewise_node_uptime_seconds", [name], w.uptime_s)
    for kind, n in sorted(node.update_events.items()):
        f.add("edgewise_node_update_events", [name, kind], n)
    for model, kind in sorted(node.update_state.items()):
        f.add("edgewise_node_update_state", [name, model, kind], 1)
    for model, release in sorted(node.model_release.items()):
        f.add("edgewise_node_model_release", [name, model], release)


def _worker(f: _Families, name: str, worker: WorkerMetrics) -> None:
    s, t = worker.status, worker.telemetry
    if s is not None:
        f.add("edgewise_worker_up", [name], s.state != "offline")
        for r in s.reasons:
            f.add("edgewise_worker_degraded", [name, r], 1)
    if t is None:
        return
    for key, n in sorted(t.counts.items()):  # totals since the worker's boot
        f.add("edgewise_worker_count", [name, key], n)
    for reason, n in sorted(t.rejects.items()):
        f.add("edgewise_worker_rejects", [name, reason], n)
    for stage, n in sorted(t.failures.items()):
        f.add("edgewise_worker_failures", [name, stage], n)
    f.add("edgewise_worker_uptime_seconds", [name], t.uptime_s)


def _bridge(f: _Families, name: str, bridge: BridgeMetrics) -> None:
    s, t = bridge.status, bridge.telemetry
    if s is not None:
        f.add("edgewise_bridge_up", [name], s.state != "offline")
        for r in s.reasons:
            f.add("edgewise_bridge_degraded", [name, r], 1)
    if t is None:
        return
    for direction, d in (("up", t.up), ("down", t.down)):
        labels = [name, direction]
        f.add("edgewise_bridge_received", labels, d.received)
        f.add("edgewise_bridge_delivered", labels, d.delivered)
        f.add("edgewise_bridge_refused", labels, d.refused)
        f.add("edgewise_bridge_evicted", labels, d.evicted)
        for reason, n in (
            ("echo", d.echoes_dropped),
            ("oversize", d.oversize_dropped),
            ("unmatched", d.unmatched),
            ("failed", d.failed),
        ):
            f.add("edgewise_bridge_dropped", [*labels, reason], n)
        f.add("edgewise_bridge_queue_records", labels, d.queue_rows)
        f.add("edgewise_bridge_queue_bytes", labels, d.queue_bytes)
        f.add("edgewise_bridge_queue_max_bytes", labels, d.queue_max_bytes)
        f.add("edgewise_bridge_in_flight", labels, d.in_flight)

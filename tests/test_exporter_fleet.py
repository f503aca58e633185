"""The exporter's fleet state and its Prometheus text (pure: real telemetry windows, status and
events encoded as nodes encode them; the live path with a real node and a real Prometheus is in
tests/test_exporter_prometheus.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker_bridge.wire import BridgeTelemetry, DirectionTelemetry
from broker_bridge.wire import encode_telemetry as enc_bridge
from edgewise.cli.exporter import METRICS, FleetMetrics
from edgewise.cli.exporter.collector import FleetCollector
from edgewise.releases import UpdateEvent, encode_event
from edgewise.telemetry import HostMetrics, LatencySketch, TelemetryWindow, merged
from schemas import (
    Status,
    Telemetry,
    WorkerTelemetry,
    encode_status,
    encode_telemetry,
    encode_worker_telemetry,
)

HOST = HostMetrics(rss_bytes=50_000_000, cpu_temp_c=41.5, uptime_s=100.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def window(w: TelemetryWindow, ts: float, latencies: list[float], **counts: int) -> Telemetry:
    for ms in latencies:
        w.observe_latency(ms)
    totals = dict(counts)
    return w.build(
        ts,
        counts_total=totals,
        rejects_total={"bad_shape": counts.get("rejected", 0)},
        evictions={"telemetry": 2},
        outbox_rows=7,
        outbox_bytes=700,
        state="online",
        model="digits",
        release=3,
        runtime="onnxruntime",
        provider="CPUExecutionProvider",
        hardware_class="x86-cpu",
        host=HOST,
    )


def scrape(
    fleet: FleetMetrics, clock: Clock
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet, threading.Lock(), clock=clock))
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, metric: str, /, **labels: str) -> float:  # type: ignore[type-arg]
    return samples[(metric, tuple(sorted(labels.items())))]


def test_counters_are_sums_of_windows_each_counted_once_and_quantiles_merge() -> None:
    clock, fleet = Clock(), FleetMetrics()
    rng = np.random.default_rng(1)
    a = TelemetryWindow(node="gw-a", boot_id="boot-1", started_at=900.0)
    lat1, lat2 = list(rng.uniform(1, 5, 200)), list(rng.uniform(20, 30, 100))
    w1 = window(a, 910.0, lat1, frames=200, results=200, rejected=3, cloud=4, takeovers=1)
    w2 = window(a, 920.0, lat2, frames=300, results=300, rejected=3, cloud=4, takeovers=1)
    for w in (w1, w2, w1):  # w1 again: delivered twice by the outbox
        fleet.ingest("edge/gw-a/telemetry", encode_telemetry(w), clock.now)
    s = scrape(fleet, clock)
    assert value(s, "edgewise_node_frames_total", node="gw-a") == 300
    assert value(s, "edgewise_node_results_total", node="gw-a") == 300
    assert value(s, "edgewise_node_rejects_total", node="gw-a", reason="bad_shape") == 3
    assert value(s, "edgewise_node_count_total", node="gw-a", name="takeovers") == 1
    assert value(s, "edgewise_node_escalation_verdicts_total", node="gw-a", source="cloud") == 4
    assert value(s, "edgewise_exporter_duplicate_windows_total") == 1
    assert value(s, "edgewise_node_outbox_records", node="gw-a") == 7
    assert value(s, "edgewise_node_outbox_evictions_total", node="gw-a", kind="telemetry") == 2
    assert value(s, "edgewise_node_resident_memory_bytes", node="gw-a") == 50_000_000
    assert value(s, "edgewise_node_cpu_temperature_celsius", node="gw-a") == 41.5
    assert value(s, "edgewise_node_latency_seconds_count", node="gw-a") == 300
    assert value(s, "edgewise_node_latency_seconds_sum", node="gw-a") == pytest.approx(
        sum(lat1 + lat2) / 1000, rel=1e-9
    )
    both = merged([LatencySketch.from_bytes(w.latency) for w in (w1, w2)])
    p99 = both.quantile(0.99)
    assert p99 is not None
    assert value(s, "edgewise_node_latency_seconds", node="gw-a", quantile="0.99") == p99 / 1000
    assert value(s, "edgewise_fleet_latency_seconds", quantile="0.99") == p99 / 1000
    info = value(
        s, "edgewise_node_info", node="gw-a", model="digits", release="3",
        hardware_class="x86-cpu", runtime="onnxruntime", provider="CPUExecutionProvider",
    )  # fmt: skip
    assert info == 1


def test_the_fleet_p99_is_the_p99_of_the_merged_sketches_not_an_average() -> None:
    clock, fleet = Clock(), FleetMetrics()
    sketches = []
    for name, lat in (("gw-a", [1.0] * 990), ("gw-b", [100.0] * 10)):
        w = window(TelemetryWindow(node=name, boot_id="b", started_at=900.0), 910.0, lat, frames=1)
        fleet.ingest(f"edge/{name}/telemetry", encode_telemetry(w), clock.now)
        sketches.append(LatencySketch.from_bytes(w.latency))
    s = scrape(fleet, clock)
    fleet_p99 = value(s, "edgewise_fleet_latency_seconds", quantile="0.99")
    expected = merged(sketches).quantile(0.99)
    assert expected is not None
    assert fleet_p99 == expected / 1000
    mean_of_p99s = (
        value(s, "edgewise_node_latency_seconds", node="gw-a", quantile="0.99")
        + value(s, "edgewise_node_latency_seconds", node="gw-b", quantile="0.99")
    ) / 2
    assert fleet_p99 != pytest.approx(mean_of_p99s, rel=0.05)


def test_quantiles_cover_only_windows_younger_than_max_age() -> None:
    clock, fleet = Clock(), FleetMetrics(max_age_s=30.0)
    w = window(TelemetryWindow(node="gw-a", boot_id="b", started_at=900.0), 910.0, [3.0], frames=1)
    fleet.ingest("edge/gw-a/telemetry", encode_telemetry(w), clock.now)
    assert ("edgewise_fleet_latency_seconds", (("quantile", "0.5"),)) in scrape(fleet, clock)
    clock.now += 31
    s = scrape(fleet, clock)
    assert ("edgewise_fleet_latency_seconds", (("quantile", "0.5"),)) not in s
    assert value(s, "edgewise_node_latency_seconds_count", node="gw-a") == 1  # kept


def test_status_reasons_workers_bridges_and_update_events() -> None:
    clock, fleet = Clock(), FleetMetrics()
    st = Status(node="gw-a", state="degraded", ts=5.0, reasons=["uplink_down", "evicting"])
    fleet.ingest("edge/gw-a/status", encode_status(st), clock.now)
    w1 = Status(node="w-1", state="online", ts=5.0, runtime="worker")
    fleet.ingest("cloud/workers/w-1/status", encode_status(w1), clock.now)
    for i, kind in enumerate(("downloading", "activated", "committed")):
        ev = UpdateEvent(
            id=f"e{i}", node="gw-a", ts=10.0 + i, kind=kind, model="digits", release=4,  # type: ignore[arg-type]
            running_release=4 if kind != "downloading" else 3,
        )  # fmt: skip
        fleet.ingest("edge/gw-a/events", encode_event(ev), clock.now)
        fleet.ingest("edge/gw-a/events", encode_event(ev), clock.now)  # retained copy again
    d = DirectionTelemetry(
        received=10, queued=10, delivered=8, published=8, refused=1, echoes_dropped=2,
        oversize_dropped=0, unmatched=0, evicted=0, queue_rows=2, queue_bytes=200,
        queue_file_bytes=4096, queue_max_bytes=1 << 20, in_flight=1, source_connected=True,
        target_connected=False,
    )  # fmt: skip
    bt = BridgeTelemetry(bridge="bridge-s1", site="s1", ts=5.0, seq=0, up=d, down=d)
    fleet.ingest("bridges/bridge-s1/telemetry", enc_bridge(bt), clock.now)
    s = scrape(fleet, clock)
    assert value(s, "edgewise_node_up", node="gw-a") == 1
    assert value(s, "edgewise_node_degraded", node="gw-a", reason="uplink_down") == 1
    assert value(s, "edgewise_fleet_nodes", state="degraded") == 1
    assert value(s, "edgewise_worker_up", worker="w-1") == 1
    assert value(s, "edgewise_node_update_events_total", node="gw-a", kind="committed") == 1
    assert (
        value(s, "edgewise_node_update_state", node="gw-a", model="digits", state="committed") == 1
    )
    assert value(s, "edgewise_node_model_release", node="gw-a", model="digits") == 4
    assert value(s, "edgewise_bridge_delivered_total", bridge="bridge-s1", direction="up") == 8
    assert (
        value(
            s, "edgewise_bridge_dropped_total", bridge="bridge-s1", direction="down", reason="echo"
        )
        == 2
    )
    assert value(s, "edgewise_bridge_queue_records", bridge="bridge-s1", direction="up") == 2


def test_a_cleared_retained_status_drops_every_series_of_the_node() -> None:
    clock, fleet = Clock(), FleetMetrics()
    w = window(TelemetryWindow(node="gw-a", boot_id="b", started_at=900.0), 910.0, [3.0], frames=1)
    fleet.ingest("edge/gw-a/telemetry", encode_telemetry(w), clock.now)
    fleet.ingest("edge/gw-a/status", encode_status(Status(node="gw-a", state="offline", ts=1.0)), 0)
    fleet.ingest("edge/gw-b/status", encode_status(Status(node="gw-b", state="online", ts=1.0)), 0)
    assert any(dict(k[1]).get("node") == "gw-a" for k in scrape(fleet, clock))
    fleet.ingest("edge/gw-a/status", b"", clock.now)  # edgewise fleet forget gw-a
    s = scrape(fleet, clock)
    assert not any(dict(k[1]).get("node") == "gw-a" for k in s)
    assert value(s, "edgewise_node_up", node="gw-b") == 1
    assert value(s, "edgewise_exporter_forgotten_total") == 1


@pytest.mark.parametrize(
    ("topic", "payload", "kind", "reason"),
    [
        ("edge/gw-a/telemetry", b"\xc1garbage", "node_telemetry", "malformed"),
        ("edge/gw-a/telemetry", b"\x00" * (1_048_576 + 1), "node_telemetry", "payload_too_large"),
        ("edge/gw-a/status", b"\x81\xa1v\x02", "node_status", "bad_version"),
        ("edge/gw-a/events", b"[[[[", "node_events", "malformed"),
        ("edge/gw-b/status", encode_status(Status(node="gw-a", state="online", ts=1.0)),
         "node_status", "node_mismatch"),
        ("bridges/b/telemetry", b"\x90", "bridge_telemetry", "bad_schema"),
        ("edge/a/b/status", b"x", "topic", "unexpected"),
    ],
)  # fmt: skip
def test_hostile_messages_are_counted_by_reason_and_add_no_source(
    topic: str, payload: bytes, kind: str, reason: str
) -> None:
    clock, fleet = Clock(), FleetMetrics()
    fleet.ingest(topic, payload, clock.now)
    assert (fleet.nodes, fleet.workers, fleet.bridges) == ({}, {}, {})
    s = scrape(fleet, clock)
    got = {
        dict(k[1])["reason"]: v for k, v in s.items() if k[0] == "edgewise_exporter_rejected_total"
    }
    assert got == {reason: 1}, got
    assert dict(next(k[1] for k in s if k[0] == "edgewise_exporter_rejected_total"))["kind"] == kind


def test_the_number_of_sources_is_bounded() -> None:
    clock, fleet = Clock(), FleetMetrics(max_sources=3)
    for i in range(10):
        st = Status(node=f"gw-{i}", state="online", ts=1.0)
        fleet.ingest(f"edge/gw-{i}/status", encode_status(st), clock.now)
    assert sorted(fleet.nodes) == ["gw-0", "gw-1", "gw-2"]
    assert fleet.rejected[("node_status", "too_many_sources")] == 7


def test_every_exposed_series_is_in_the_catalogue() -> None:
    clock, fleet = Clock(), FleetMetrics()
    w = window(TelemetryWindow(node="gw-a", boot_id="b", started_at=900.0), 910.0, [3.0], frames=1)
    fleet.ingest("edge/gw-a/telemetry", encode_telemetry(w), clock.now)
    exposed = {name for m in METRICS for name in m.exposed}
    names = {k[0] for k in scrape(fleet, clock)}
    assert names <= exposed, names - exposed
    assert len(names) > 20


def test_worker_telemetry_totals_are_exported_as_its_counters_and_a_new_boot_resets_them() -> None:
    clock, fleet = Clock(), FleetMetrics()

    def wt(boot: str, seq: int, ts: float, answered: int) -> bytes:
        t = WorkerTelemetry(
            worker="w-1", boot_id=boot, seq=seq, ts=ts, window_s=10.0, state="degraded",
            reasons=["client_id_conflict"], counts={"answered": answered, "takeovers": 2},
            rejects={"malformed": 1}, uptime_s=100.0,
        )  # fmt: skip
        return encode_worker_telemetry(t)

    fleet.ingest("cloud/workers/w-1/telemetry", wt("b1", 1, 20.0, 50), clock.now)
    fleet.ingest("cloud/workers/w-1/telemetry", wt("b1", 0, 10.0, 30), clock.now)  # older
    s = scrape(fleet, clock)
    assert value(s, "edgewise_worker_count_total", worker="w-1", name="answered") == 50
    assert value(s, "edgewise_worker_count_total", worker="w-1", name="takeovers") == 2
    assert value(s, "edgewise_worker_rejects_total", worker="w-1", reason="malformed") == 1
    fleet.ingest("cloud/workers/w-1/telemetry", wt("b2", 0, 30.0, 5), clock.now)  # restarted
    s = scrape(fleet, clock)
    assert value(s, "edgewise_worker_count_total", worker="w-1", name="answered") == 5

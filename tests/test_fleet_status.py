"""`edgewise fleet status` against a real Mosquitto, with three fake nodes publishing windows
built by the real TelemetryWindow (the node's own integration is tested with the node)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import pytest

from edgewise.cli.fleet_view import FleetView, newer_window
from edgewise.local_broker import BrokerInfo, MosquittoProcess, MqttProbe, free_port
from edgewise.telemetry import HostMetrics, LatencySketch, TelemetryWindow, merged
from schemas import Status, Telemetry, encode_status, encode_telemetry
from tests import cli_harness

ProbeFactory = Callable[..., MqttProbe]
NOW = time.time()


def edgewise(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return cli_harness.edgewise(*args, timeout_s=timeout_s, columns=250)


@dataclass
class FakeNode:
    """What one node published: its latest window, an older one, and the latencies."""

    name: str
    latest: Telemetry
    older: list[Telemetry]
    latencies: np.ndarray
    status: Status
    extra: dict[str, Any] = field(default_factory=dict)


def _window(
    w: TelemetryWindow, now: float, latencies: np.ndarray, frames: int, escalations: int, **kw: Any
) -> Telemetry:
    for ms in latencies:
        w.observe_latency(float(ms))
    return w.build(
        now,
        counts_total={"frames": frames, "results": frames, "escalations": escalations},
        rejects_total={"malformed": 1},
        evictions=kw.pop("evictions", {}),
        outbox_rows=kw.pop("outbox_rows", 0),
        outbox_bytes=kw.pop("outbox_rows", 0) * 100,
        state=kw.pop("state", "online"),
        model="digits",
        release=3,
        runtime="onnxruntime",
        provider="CPUExecutionProvider",
        hardware_class="x86-cpu",
        host=HostMetrics(rss_bytes=50_000_000, cpu_temp_c=None, uptime_s=100.0),
        **kw,
    )


def make_fleet() -> list[FakeNode]:
    rng = np.random.default_rng(5)
    nodes = []
    for i, (name, mu) in enumerate((("gw-a", 0.5), ("gw-b", 1.5), ("gw-c", 2.5))):
        boot = f"{name}-boot-2"
        w = TelemetryWindow(node=name, boot_id=boot, started_at=NOW - 20)
        # The older window of this boot: slow latencies that must not win.
        old = _window(w, NOW - 10, rng.uniform(900, 1000, 300), 300, 300)
        fresh = rng.lognormal(mu, 0.6, 1000 + 500 * i)
        latest = _window(
            w, NOW, fresh, 300 + len(fresh), 300 + 10 * (i + 1),
            outbox_rows=7 * i, evictions={"telemetry": i, "results": 0},
        )  # fmt: skip
        # A backlog window of an earlier boot with a larger seq (forwarded after an outage).
        earlier_boot = TelemetryWindow(node=name, boot_id=f"{name}-boot-1", started_at=NOW - 900)
        earlier_boot.seq = 40
        backlog = _window(earlier_boot, NOW - 800, rng.uniform(5000, 6000, 50), 50, 0)
        state = "degraded" if name == "gw-b" else "online"
        reasons = ["uplink_down"] if name == "gw-b" else []
        status = Status(
            node=name, state=state, ts=NOW - 5, reasons=reasons, model="digits", release=3,
            boot_id=boot,
        )  # fmt: skip
        nodes.append(FakeNode(name, latest, [old, backlog], fresh, status))
    return nodes


GARBAGE = [
    ("edge/gw-bad/telemetry", b"\xc1not msgpack"),
    ("edge/gw-bad/status", b"\x81\xa1v\x02"),
]


@contextlib.contextmanager
def publishing(probe: MqttProbe, nodes: list[FakeNode]) -> Iterator[None]:
    """Retained statuses once; then, until the block ends, every window (latest first, then
    the stale ones) and the malformed messages, again and again: whenever the command
    subscribed, it sees all of them in some order."""
    for n in nodes:
        probe.publish(f"edge/{n.name}/status", encode_status(n.status), retain=True)
    mismatched = encode_telemetry(nodes[0].latest)  # node gw-a's window on gw-x's topic
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for n in nodes:
                for t in (n.latest, *n.older):
                    probe.publish(f"edge/{n.name}/telemetry", encode_telemetry(t))
            for topic, payload in GARBAGE:
                probe.publish(topic, payload)
            probe.publish("edge/gw-x/telemetry", mismatched)
            stop.wait(0.2)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


@pytest.fixture
def broker(fresh_mosquitto: MosquittoProcess) -> BrokerInfo:
    return fresh_mosquitto.info


def test_fleet_status_json(broker: BrokerInfo, mqtt_probe: ProbeFactory) -> None:
    nodes = make_fleet()
    with publishing(mqtt_probe(broker), nodes):
        out = edgewise("fleet", "status", "--broker", broker.url, "--duration", "3", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rows = {r["node"]: r for r in report["nodes"]}
    assert sorted(rows) == ["gw-a", "gw-b", "gw-c"]
    for i, n in enumerate(nodes):
        row = rows[n.name]
        sketch = LatencySketch.from_bytes(n.latest.latency)
        assert row["seq"] == n.latest.seq == 1
        assert row["boot_id"] == n.latest.boot_id
        assert row["p50_ms"] == sketch.quantile(0.5)
        assert row["p99_ms"] == sketch.quantile(0.99)
        assert row["p99_ms"] < 900  # neither stale window replaced the latest one
        assert row["latency_count"] == len(n.latencies)
        assert row["frames_per_s"] == pytest.approx(len(n.latencies) / 10.0)
        assert row["escalation_rate"] == pytest.approx(10 * (i + 1) / len(n.latencies))
        assert row["outbox_rows"] == 7 * i
        assert row["evictions"] == i
        assert (row["model"], row["release"]) == ("digits", 3)
        assert row["state"] == n.status.state
        assert row["reasons"] == n.status.reasons
        assert row["last_seen_s"] >= 0
    fleet = report["fleet"]
    union = np.concatenate([n.latencies for n in nodes])
    expected = merged([LatencySketch.from_bytes(n.latest.latency) for n in nodes])
    assert fleet["latency_count"] == len(union) == expected.count
    assert fleet["p99_ms"] == expected.quantile(0.99)
    assert fleet["p50_ms"] == expected.quantile(0.5)
    exact_p99 = float(np.quantile(union, 0.99, method="lower"))
    assert abs(fleet["p99_ms"] - exact_p99) <= 0.01 * exact_p99
    assert fleet["frames_per_s"] == pytest.approx(len(union) / 10.0)
    assert report["malformed"] >= 3
    by_reason = report["malformed_by_reason"]
    assert by_reason["telemetry: malformed"] >= 1
    assert by_reason["status: bad_version"] >= 1
    assert by_reason["telemetry: node_mismatch"] >= 1
    assert report["stale_windows"] >= 2


def test_fleet_status_table(broker: BrokerInfo, mqtt_probe: ProbeFactory) -> None:
    nodes = make_fleet()
    with publishing(mqtt_probe(broker), nodes):
        out = edgewise("fleet", "status", "-b", broker.url, "-d", "2.5")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for n in nodes:
        row = next(line for line in lines if f" {n.name} " in line)
        p99 = LatencySketch.from_bytes(n.latest.latency).quantile(0.99)
        assert p99 is not None
        assert f"{p99:.3g}" in row
        assert "digits@3" in row
    assert "x86-cpu · onnxruntime" in out.stdout  # the class and what really serves
    assert "degraded uplink_down" in out.stdout
    fleet = merged([LatencySketch.from_bytes(n.latest.latency) for n in nodes])
    fleet_p99 = fleet.quantile(0.99)
    assert fleet_p99 is not None
    assert f"p99 {fleet_p99:.3g} ms" in out.stdout
    assert "malformed messages ignored" in out.stdout


def test_status_only_nodes_are_listed(broker: BrokerInfo, mqtt_probe: ProbeFactory) -> None:
    status = Status(node="quiet-1", state="offline", ts=NOW - 30)
    mqtt_probe(broker).publish("edge/quiet-1/status", encode_status(status), retain=True)
    out = edgewise("fleet", "status", "-b", broker.url, "-d", "1", "--json")
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)["nodes"]
    assert (row["node"], row["state"], row["p99_ms"]) == ("quiet-1", "offline", None)
    assert row["last_seen_s"] == pytest.approx(time.time() - status.ts, abs=30)


def test_unreachable_broker_says_what_to_do() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    out = edgewise("fleet", "status", "--broker", url, "--duration", "1")
    assert out.returncode == 2
    assert f"cannot connect to {url}: connection refused" in out.stderr
    assert "is the broker running?" in out.stderr


def test_help_names_the_options() -> None:
    out = edgewise("fleet", "status", "--help")
    assert out.returncode == 0
    for option in ("--broker", "--duration", "--json", "--edge-root"):
        assert option in out.stdout


# ---------------------------------------------------------------- pure ordering rules
def _t(boot: str, seq: int, ts: float) -> Telemetry:
    s = LatencySketch()
    return Telemetry(
        node="n", id=f"{boot}-{seq}", boot_id=boot, seq=seq, ts=ts, window_s=10.0,
        state="online", latency=s.to_bytes(), latency_count=0, uptime_s=1.0,
    )  # fmt: skip


def test_newer_window_within_a_boot_goes_by_seq_not_clock() -> None:
    assert newer_window(_t("b", 2, 100.0), _t("b", 1, 500.0))  # the clock jumped back
    assert not newer_window(_t("b", 1, 500.0), _t("b", 2, 100.0))
    assert not newer_window(_t("b", 2, 100.0), _t("b", 2, 100.0))


def test_newer_window_across_boots_goes_by_ts() -> None:
    assert newer_window(_t("new", 0, 1000.0), _t("old", 50, 900.0))
    assert not newer_window(_t("old", 50, 900.0), _t("new", 0, 1000.0))


def test_view_counts_what_it_refuses_and_never_raises() -> None:
    view = FleetView()
    for topic, payload in [
        ("edge/n/telemetry", b""),
        ("edge/n/telemetry", msgspec.msgpack.encode({"v": 1})),
        ("edge/n/status", b"\xff" * 10),
        ("edge/n/other", b""),
        ("elsewhere/n/telemetry", b""),
        ("edge/n/x/telemetry", b""),
        ("edge/n/status", b""),  # an empty retained message: a deletion, not an error
    ]:
        view.ingest(topic, payload)
    assert view.nodes == {}
    assert view.malformed == {
        "telemetry: malformed": 1, "telemetry: bad_schema": 1, "status: malformed": 1,
        "topic: unexpected": 3,
    }  # fmt: skip
    assert view.report(NOW)["fleet"]["p99_ms"] is None

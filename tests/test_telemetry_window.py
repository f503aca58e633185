"""Telemetry windows: deltas from cumulative counters, seq, sketch reset, host metrics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil
import pytest

from edgewise.telemetry import HostMetrics, LatencySketch, TelemetryWindow, deltas, host_metrics
from edgewise.telemetry.host import cpu_temp_c, zone_temp_c
from schemas import decode_telemetry, encode_telemetry

HOST = HostMetrics(rss_bytes=123, cpu_temp_c=51.5, uptime_s=7.0)


def build(w: TelemetryWindow, now: float, **change: Any) -> Any:
    args: dict[str, Any] = {
        "counts_total": {"frames": 0},
        "rejects_total": {},
        "evictions": {},
        "outbox_rows": 0,
        "outbox_bytes": 0,
        "state": "online",
        "host": HOST,
    }
    args.update(change)
    return w.build(now, **args)


def test_windows_carry_deltas_seq_and_a_fresh_sketch() -> None:
    w = TelemetryWindow(node="gw-1", boot_id="boot-a", started_at=1000.0)
    for ms in (1.0, 2.0, 3.0):
        w.observe_latency(ms)
    first = build(
        w, 1010.0,
        counts_total={"frames": 3, "results": 3, "escalations": 1},
        rejects_total={"malformed": 2},
        evictions={"telemetry": 5},
        outbox_rows=4, outbox_bytes=400, state="degraded", reasons=["uplink_down"],
        model="digits", release=3, runtime="onnxruntime", provider="CPUExecutionProvider",
        hardware_class="x86-cpu",
    )  # fmt: skip
    w.observe_latency(10.0)
    second = build(
        w, 1020.5,
        counts_total={"frames": 4, "results": 4, "escalations": 1},
        rejects_total={"malformed": 2, "bad_shape": 1},
        evictions={"telemetry": 7},
    )  # fmt: skip
    assert (first.seq, second.seq) == (0, 1)
    assert first.boot_id == second.boot_id == "boot-a"
    assert first.id < second.id
    assert (first.ts, first.window_s, second.window_s) == (1010.0, 10.0, 10.5)
    assert first.counts == {"frames": 3, "results": 3, "escalations": 1}
    assert second.counts == {"frames": 1, "results": 1, "escalations": 0}
    assert second.rejects == {"malformed": 0, "bad_shape": 1}
    assert second.evictions == {"telemetry": 7}  # cumulative, not a delta
    assert (first.latency_count, second.latency_count) == (3, 1)
    assert LatencySketch.from_bytes(second.latency).quantile(0.5) == 10.0
    assert first.model == "digits" and first.hardware_class == "x86-cpu"
    assert (first.rss_bytes, first.cpu_temp_c, first.uptime_s) == (123, 51.5, 7.0)
    for t in (first, second):
        assert decode_telemetry(encode_telemetry(t)) == t


def test_a_counter_that_went_down_was_reset() -> None:
    assert deltas({"a": 3, "b": 10}, {"a": 5, "b": 4}) == {"a": 3, "b": 6}


@pytest.mark.parametrize(
    "change",
    [
        {"counts_total": {"Frames": 1}},
        {"counts_total": {"frames": -1}},
        {"rejects_total": {"bad reason": 1}},
        {"evictions": {f"k{i}": 1 for i in range(65)}},
        {"counts_total": {"frames": 1.5}},
    ],
)
def test_counters_the_contract_refuses_raise_and_change_nothing(change: dict[str, Any]) -> None:
    w = TelemetryWindow(node="gw-1", boot_id="b", started_at=0.0)
    w.observe_latency(1.0)
    with pytest.raises(ValueError, match=r"counter|must be"):
        build(w, 10.0, **change)
    assert w.seq == 0
    assert w.sketch.count == 1


def test_host_metrics_of_this_process() -> None:
    now = psutil.Process().create_time() + 42.0
    m = host_metrics(now)
    assert m.rss_bytes is not None
    assert m.rss_bytes == pytest.approx(psutil.Process(os.getpid()).memory_info().rss, rel=0.5)
    assert m.uptime_s == pytest.approx(42.0)
    assert m.cpu_temp_c is None or -50.0 < m.cpu_temp_c < 150.0
    assert m.cpu_temp_c == cpu_temp_c()


def test_build_reads_the_host_when_not_given() -> None:
    w = TelemetryWindow(node="gw-1", boot_id="b", started_at=0.0)
    t = w.build(
        psutil.Process().create_time() + 3.0,
        counts_total={}, rejects_total={}, evictions={}, outbox_rows=0, outbox_bytes=0,
        state="online",
    )  # fmt: skip
    assert t.rss_bytes is not None and t.rss_bytes > 1_000_000
    assert t.uptime_s == pytest.approx(3.0)


def _zone(root: Path, n: int, kind: str, milli: str) -> None:
    zone = root / f"thermal_zone{n}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(kind + "\n")
    (zone / "temp").write_text(milli + "\n")


def test_thermal_zones_prefer_the_cpu(tmp_path: Path) -> None:
    _zone(tmp_path, 0, "acpitz", "40000")
    _zone(tmp_path, 1, "x86_pkg_temp", "61500")
    _zone(tmp_path, 2, "iwlwifi_1", "70000")
    _zone(tmp_path, 3, "cpu-thermal", "garbage")
    assert zone_temp_c(tmp_path) == 61.5


def test_no_thermal_zone_means_none(tmp_path: Path) -> None:
    assert zone_temp_c(tmp_path) is None
    assert zone_temp_c(tmp_path / "missing") is None
    _zone(tmp_path, 0, "cpu", "999999999")  # implausible: ignored
    assert zone_temp_c(tmp_path) is None


def test_the_merge_example_in_the_docs_runs(capsys: pytest.CaptureFixture[str]) -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "telemetry.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    payloads = []
    for node, ms in (("a", 1.0), ("b", 100.0)):
        w = TelemetryWindow(node=node, boot_id="b", started_at=0.0)
        for _ in range(50):
            w.observe_latency(ms)
        payloads.append(encode_telemetry(build(w, 10.0)))
    exec(example, {"payloads": payloads})
    count, p50, p99 = capsys.readouterr().out.split()
    assert count == "100"
    assert float(p50) == pytest.approx(1.0, rel=0.01)
    assert float(p99) == pytest.approx(100.0, rel=0.01)

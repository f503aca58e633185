"""`edgewise demo`: the Mosquitto path as a real process, the embedded-broker path, --broker."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid

import pytest
from rich.console import Console

import edgewise.cli.demo
from edgewise.cli.demo import run_demo
from edgewise.local_broker import BrokerInfo
from tests.conftest import ProbeFactory


def _figure(output: str, row: str) -> int:
    match = re.search(rf"{re.escape(row)}\D*([\d,]+)", output)
    assert match, f"no {row!r} row in the summary:\n{output}"
    return int(match.group(1).replace(",", ""))


def test_demo_command_starts_mosquitto_and_answers_every_frame() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", "demo", "--duration", "2", "--rate", "100"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin:/usr/sbin"},
    )
    assert out.returncode == 0, out.stderr
    assert "started Mosquitto" in out.stdout
    assert "edgewise demo: summary" in out.stdout
    sent = _figure(out.stdout, "frames sent")
    assert sent >= 100
    assert _figure(out.stdout, "results received") == sent
    accuracy = re.search(r"accuracy so far\D*([\d.]+)%", out.stdout)
    assert accuracy
    assert float(accuracy.group(1)) > 80.0


def test_demo_without_mosquitto_runs_the_embedded_broker_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(edgewise.cli.demo, "mosquitto_path", lambda: None)
    console = Console(record=True, width=120)
    report = asyncio.run(run_demo(duration_s=1.5, rate_hz=100, console=console, live=False))
    text = console.export_text()
    assert "embedded amqtt broker (MQTT 3.1.1)" in text
    assert "apt-get install mosquitto" in text
    assert report.broker.startswith("embedded mqtt://127.0.0.1:")
    assert report.sent >= 100
    assert report.results == report.sent
    assert report.duplicates == 0
    assert report.accuracy > 0.8


def test_demo_uses_an_existing_broker_when_given_one(mosquitto: BrokerInfo) -> None:
    console = Console(record=True, width=120)
    report = asyncio.run(
        run_demo(
            duration_s=1.0,
            rate_hz=50,
            broker_url=mosquitto.url,
            console=console,
            live=False,
            node_id="demo-external",
        )
    )
    assert report.broker == f"external {mosquitto.url}"
    assert "started Mosquitto" not in console.export_text()
    assert report.sent >= 50
    assert report.results == report.sent
    assert len(report.latencies_ms) == report.results


def test_demo_rolls_out_one_signed_update_without_losing_a_frame(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    console = Console(record=True, width=140)
    report = asyncio.run(
        run_demo(
            duration_s=4.0,
            rate_hz=100,
            broker_url=mosquitto.url,
            console=console,
            live=False,
            node_id="demo-update",
            update_at_s=1.0,
        )
    )
    steps = [kind for _, kind in report.update_steps]
    assert steps == ["downloading", "verified", "validating", "activated", "committed"]
    assert report.update_release == 2
    # Every frame answered once, by release 1 before the swap and release 2 after it.
    assert report.results == report.sent >= 300
    assert report.duplicates == 0
    assert report.by_release[1] > 0 and report.by_release[2] > 0
    assert sum(report.by_release.values()) == report.results
    assert report.inference_errors == 0
    text = console.export_text()
    assert "model update to r2" in text and "committed" in text
    assert "largest result gap during it" in text
    # The run's retained release is gone from the broker afterwards: a subscriber gets no
    # retained copy (Mosquitto sends them before anything published after the subscription).
    assert len(report.update_topics) >= 3  # key set, chunks, manifest
    probe = mqtt_probe()
    marker = f"demo-test/{uuid.uuid4().hex}"
    for topic in [*report.update_topics, marker]:
        probe.subscribe(topic)
    probe.publish(marker, b"end")
    probe.wait_for(lambda m: m.topic == marker, 5)
    assert [m.topic for m in probe.messages if m.topic != marker] == []

"""The `edgewise` command: --help that answers, `sensor simulate`, `watch`, clear usage errors."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import pytest

from edgewise.local_broker import BrokerInfo, MqttProbe
from schemas import Limits, Status, decode_frame, decode_frames, encode_status
from tests import cli_harness

ProbeFactory = Callable[..., MqttProbe]


def edgewise(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return cli_harness.edgewise(*args, timeout_s=timeout_s, columns=200)


def test_help_lists_every_subcommand() -> None:
    out = edgewise("--help")
    assert out.returncode == 0
    for name in ("node", "demo", "sensor", "watch", "fleet"):
        assert name in out.stdout


@pytest.mark.parametrize(
    ("args", "options"),
    [
        (["node", "--help"], ["--config", "--broker", "--node-id", "EDGEWISE_"]),
        (["demo", "--help"], ["--duration", "--rate", "--broker"]),
        (
            ["sensor", "simulate", "--help"],
            ["--rate", "--count", "--qos", "--format", "--frames-per-message"],
        ),
        (["watch", "--help"], ["--count", "--timeout", "--raw"]),
    ],
)
def test_subcommand_help_names_its_options(args: list[str], options: list[str]) -> None:
    out = edgewise(*args)
    assert out.returncode == 0
    for option in options:
        assert option in out.stdout


def test_sensor_simulate_publishes_valid_frames(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    probe = mqtt_probe()
    probe.subscribe("sensors/cli-sim/cam/#")
    out = edgewise(
        "sensor", "simulate", "--broker", mosquitto.url, "--device", "cli-sim", "--sensor", "cam",
        "--count", "20", "--rate", "500", "--format", "json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "sent 20 frames" in out.stdout
    assert "20 acknowledged, 0 failed" in out.stdout
    messages = probe.wait_count(20, 10)
    frames = [decode_frame(m.payload, Limits()) for m in messages]
    assert [f.seq for f in frames] == list(range(20))
    assert all(f.tensor.shape == (8, 8) for f in frames)
    assert all(m.payload.startswith(b"{") for m in messages)


def test_sensor_simulate_sends_frame_batches(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    probe = mqtt_probe()
    probe.subscribe("sensors/cli-batch/cam/#")
    out = edgewise(
        "sensor", "simulate", "--broker", mosquitto.url, "--device", "cli-batch", "--sensor",
        "cam", "--count", "20", "--rate", "1000", "--frames-per-message", "8",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "sent 20 frames" in out.stdout and "20 acknowledged, 0 failed" in out.stdout
    messages = probe.wait_count(3, 10)
    batches = [decode_frames(m.payload, Limits()) for m in messages]
    assert [len(b) for b in batches] == [8, 8, 4]
    assert [f.seq for b in batches for f in b] == list(range(20))


def test_watch_decodes_messagepack(mosquitto: BrokerInfo, mqtt_probe: ProbeFactory) -> None:
    node = f"watch-{time.monotonic_ns()}"
    status = Status(node=node, state="degraded", ts=1.5, reasons=["accelerator_unavailable"])
    mqtt_probe().publish(f"edge/{node}/status", encode_status(status), qos=1, retain=True)
    out = edgewise("watch", f"edge/{node}/#", "--broker", mosquitto.url, "--count", "1", "-t", "20")
    assert out.returncode == 0, out.stderr
    assert f"edge/{node}/status" in out.stdout
    assert "retained" in out.stdout
    assert "accelerator_unavailable" in out.stdout
    assert "degraded" in out.stdout


def test_watch_shows_payloads_as_json_not_python_reprs(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    node = f"watch-{time.monotonic_ns()}"
    status = Status(node=node, state="online", ts=1.5, reasons=["a" * 40] * 8)
    probe = mqtt_probe()
    probe.publish(f"edge/{node}/status", encode_status(status), qos=1, retain=True)
    probe.publish(f"edge/{node}/blob", b"\x00\x01\nline" * 1000, qos=1, retain=True)
    out = edgewise(
        "watch", f"edge/{node}/#", "--broker", mosquitto.url, "-n", "2", "-t", "20", "--raw"
    )
    assert out.returncode == 0, out.stderr
    assert "b'" not in out.stdout and "\\x00\\x01\\nline" in out.stdout  # escaped, one line
    out = edgewise("watch", f"edge/{node}/status", "--broker", mosquitto.url, "-n", "1", "-t", "20")
    assert out.returncode == 0, out.stderr
    body = out.stdout.splitlines()[1].strip()
    assert json.loads(body)["reasons"] == ["a" * 40] * 8  # all of them: nothing cut at 16 items
    assert "'" not in body


def test_watch_says_when_nothing_came(mosquitto: BrokerInfo) -> None:
    out = edgewise("watch", "nothing/here/#", "--broker", mosquitto.url, "-n", "1", "-t", "0.5")
    assert out.returncode == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["watch", "--broker", "http://x"], "mqtt://"),
        (["sensor", "simulate", "--format", "xml"], "--format"),
        (["node", "--config", "/nonexistent/node.toml"], "does not exist"),
    ],
)
def test_usage_errors_exit_2_with_a_message(args: list[str], message: str) -> None:
    out = edgewise(*args)
    assert out.returncode == 2
    assert message in out.stderr

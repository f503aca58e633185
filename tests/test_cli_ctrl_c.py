"""Ctrl-C on `sensor simulate` and on `demo`: a clean stop with the summary so far.

Ctrl-C at a terminal sends SIGINT to the whole foreground process group: the commands run in
a group of their own here and get it the same way (os.killpg)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from edgewise.local_broker import BrokerInfo
from tests.conftest import ProbeFactory


def _figure(output: str, row: str) -> int:
    match = re.search(rf"{re.escape(row)}\D*([\d,]+)", output)
    assert match, f"no {row!r} row in the summary:\n{output}"
    return int(match.group(1).replace(",", ""))


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgewise.cli.app", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin:/usr/sbin"},
        start_new_session=True,
    )


def test_sensor_simulate_names_its_broker_and_sums_up_on_ctrl_c(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    device = f"ctrlc-{time.monotonic_ns()}"
    probe = mqtt_probe()
    probe.subscribe(f"sensors/{device}/#")
    proc = _start("sensor", "simulate", "--broker", mosquitto.url, "--device", device, "-r", "50")
    try:
        probe.wait_count(5, 30)  # it is publishing
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, stderr
    assert f"publishing to sensors/{device}/digits on {mosquitto.url}" in stderr
    assert "Traceback" not in stderr
    match = re.search(r"sent (\d+) frames in [\d.]+ s \((\d+) acknowledged, (\d+) failed\)", stdout)
    assert match, stdout
    sent, acked, failed = map(int, match.groups())
    assert sent >= 5 and acked == sent and failed == 0
    assert "interrupted" in stdout


def test_demo_stops_cleanly_on_ctrl_c_with_the_summary_so_far(mqtt_probe: ProbeFactory) -> None:
    proc = _start("demo", "--duration", "120", "--rate", "50", "--no-update")
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the live view is off (not a terminal): lines as they come
            lines.append(line)
            if "started Mosquitto" in line:
                break
        url = re.search(r"mqtt://\S+", lines[-1])
        assert url, lines
        probe = mqtt_probe(BrokerInfo.from_url(url.group()))
        probe.subscribe("sensors/#")
        probe.wait_count(10, 60)  # the sensor runs, so the node is online
        os.killpg(proc.pid, signal.SIGINT)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    stdout = "".join(lines) + rest
    assert proc.returncode == 130, stdout + stderr
    assert "edgewise demo: summary (interrupted)" in stdout
    assert "Traceback" not in stderr and "reconnecting" not in stderr, stderr
    assert "Aborted" not in stdout + stderr
    sent, got = (_figure(stdout, row) for row in ("frames sent", "results received"))
    assert sent > 0 and got == sent  # the frames in flight were answered before the summary


def test_watch_stops_quietly_on_ctrl_c(mosquitto: BrokerInfo, mqtt_probe: ProbeFactory) -> None:
    topic = f"ctrlc/{time.monotonic_ns()}"
    mqtt_probe().publish(topic, b'{"n": 1}', retain=True)  # shown once watch has subscribed
    proc = _start("watch", topic, "--broker", mosquitto.url, "-t", "120")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if topic in line:
                break
        assert proc.stderr is not None
        said = proc.stderr.readline()  # once subscribed, it says what it watches where
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, stderr
    assert "Aborted" not in stderr and "Traceback" not in stderr
    assert f"watching {topic} on {mosquitto.url} (Ctrl-C stops)" in said

"""`edgewise fleet exporter` and `edgewise fleet forget` as an operator runs them: processes,
a real Mosquitto, /metrics over HTTP, signals, and the errors an operator meets."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgewise.local_broker import BrokerInfo, MosquittoProcess, MqttProbe, free_port
from edgewise.releases import UpdateEvent, encode_event
from schemas import Status, decode_status, encode_status

ProbeFactory = Callable[..., MqttProbe]
ENV = {"COLUMNS": "250", "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}


def edgewise(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=ENV,
    )


@contextlib.contextmanager
def exporter(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = tmp_path / "exporter.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgewise.cli.app", "fleet", "exporter", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
        try:
            yield proc, log
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def serving_port(proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(r"serving http://[^:]+:(\d+)/metrics", log.read_text())
        if m:
            return int(m.group(1))
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"the exporter did not say where it serves:\n{log.read_text()}")


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()  # type: ignore[no-any-return]


def eventually_in(port: int, line: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = metrics(port)
        if line in text.splitlines():
            return text
        time.sleep(0.2)
    raise AssertionError(f"{line!r} not in /metrics:\n{text[-3000:]}")


@pytest.fixture
def broker(fresh_mosquitto: MosquittoProcess) -> BrokerInfo:
    return fresh_mosquitto.info


def test_the_exporter_serves_a_nodes_status_and_stops_on_sigterm(
    broker: BrokerInfo, mqtt_probe: ProbeFactory, tmp_path: Path
) -> None:
    with exporter(tmp_path, "--broker", broker.url, "--listen", "127.0.0.1:0") as (proc, log):
        port = serving_port(proc, log)
        eventually_in(port, "edgewise_exporter_connected 1.0")
        status = Status(node="gw-z", state="degraded", ts=time.time(), reasons=["uplink_down"])
        mqtt_probe(broker).publish("edge/gw-z/status", encode_status(status), retain=True)
        text = eventually_in(port, 'edgewise_node_degraded{node="gw-z",reason="uplink_down"} 1.0')
        assert 'edgewise_node_up{node="gw-z"} 1.0' in text.splitlines()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_while_the_broker_is_away_it_serves_connected_0_and_catches_up(
    tmp_path: Path, mqtt_probe: ProbeFactory
) -> None:
    port = free_port()
    with exporter(tmp_path, "--broker", f"mqtt://127.0.0.1:{port}", "--listen", "127.0.0.1:0") as (
        proc,
        log,
    ):
        http = serving_port(proc, log)
        eventually_in(http, "edgewise_exporter_connected 0.0")
        assert proc.poll() is None
        broker = MosquittoProcess(tmp_path / "late", port=port)
        broker.start()
        try:
            eventually_in(http, "edgewise_exporter_connected 1.0", timeout_s=60)
            st = Status(node="gw-late", state="online", ts=time.time())
            mqtt_probe(broker.info).publish("edge/gw-late/status", encode_status(st), retain=True)
            eventually_in(http, 'edgewise_node_up{node="gw-late"} 1.0')
        finally:
            broker.stop()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize(
    ("listen", "says"),
    [("nonsense", "--listen: 'nonsense' is not HOST:PORT"), ("127.0.0.1:99999", "--listen")],
)
def test_a_bad_listen_address_is_one_line_and_exit_2(listen: str, says: str) -> None:
    out = edgewise("fleet", "exporter", "--broker", "mqtt://127.0.0.1:1", "--listen", listen)
    assert out.returncode == 2
    assert says in out.stderr and "Traceback" not in out.stderr


def test_a_port_in_use_is_one_line_and_exit_2(broker: BrokerInfo) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = edgewise("fleet", "exporter", "--broker", broker.url, "--listen", f"127.0.0.1:{port}")
    assert out.returncode == 2, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def retained(probe: MqttProbe) -> dict[str, bytes]:
    """The retained messages under edge/#: the broker sends them right after the SUBACK, so a
    message the probe publishes under the filter afterwards arrives after all of them."""
    probe.clear()
    probe.subscribe("edge/#")
    probe.publish("edge/zz-sentinel/done", b"done")
    probe.wait_for(lambda m: m.topic == "edge/zz-sentinel/done", timeout_s=10)
    return {m.topic: m.payload for m in probe.messages if m.retain and m.payload}


def test_forget_clears_a_decommissioned_nodes_retained_topics_and_refuses_a_live_one(
    broker: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    pub = mqtt_probe(broker)
    old = Status(node="gw-old", state="offline", ts=time.time() - 3600)
    live = Status(node="gw-live", state="online", ts=time.time())
    event = UpdateEvent(id="e1", node="gw-old", ts=time.time(), kind="committed", model="digits")
    pub.publish("edge/gw-old/status", encode_status(old), retain=True)
    pub.publish("edge/gw-old/events", encode_event(event), retain=True)
    pub.publish("edge/gw-live/status", encode_status(live), retain=True)

    refused = edgewise("fleet", "forget", "gw-live", "--broker", broker.url)
    assert refused.returncode == 2
    assert "node gw-live says it is online: stop it first" in refused.stderr
    done = edgewise("fleet", "forget", "gw-old", "--broker", broker.url)
    assert done.returncode == 0, done.stderr
    assert "forgot 1 node: cleared 2 retained messages" in done.stdout

    left = retained(mqtt_probe(broker))
    assert set(left) == {"edge/gw-live/status"}
    assert decode_status(left["edge/gw-live/status"]).node == "gw-live"
    again = edgewise("fleet", "forget", "gw-old", "--broker", broker.url)
    assert again.returncode == 1 and "nothing retained under edge/gw-old/#" in again.stderr
    forced = edgewise("fleet", "forget", "gw-live", "--force", "--broker", broker.url)
    assert forced.returncode == 0, forced.stderr
    assert retained(mqtt_probe(broker)) == {}

"""Hostile sizes never reach the node's memory (issue 16 point 8, ADR 0077).

A real ``edgewise node`` process, a real Mosquitto, and sensors that try to publish 20 frames of
10 MB each at once (raw sockets: one PUBLISH per connection, nothing resent). What must hold: the
node's RSS stays ≤ 150 MB (docs/benchmarks.md; its peak too), it still answers genuine frames,
and the bytes never reached it: the node's own count of bytes received from the broker (telemetry
``bytes_received``) stays far below one such frame, and the broker's log says why each was
stopped.

- Shipped broker config (``max_packet_size`` 1 MiB + 64 KiB): the broker refuses each PUBLISH
  before reading it ("disconnected due to oversize packet"), for a node on MQTT 5 and on
  MQTT 3.1.1 alike: for 3.1.1 (no Maximum Packet Size property) this cap is what protects.
- A broker that takes 16 MiB packets (the old config): the node on MQTT 5 tells the broker its
  Maximum Packet Size, and Mosquitto 2.0.11 drops each frame for it ("Dropping too large
  outgoing PUBLISH for <client id>"). The control run: the same with the node on MQTT 3.1.1
  (nothing to tell the broker) and the frames do reach it, and the counter shows it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo, Message, MosquittoProcess, MqttProbe
from edgewise.mqtt import MqttConfig, MqttSession, PublishFailed, PublishProperties
from edgewise.mqtt.session import packet_size
from schemas import decode_results, decode_status, decode_telemetry
from tests.conftest import BrokerFactory
from tests.nodeharness import frame_bytes

HOLDOUT = load_holdout()
ATTEMPTS = 20
FRAME_BYTES = 10_000_000
RSS_LIMIT_BYTES = 150_000_000
SENSOR_TOPIC = "sensors/cam-1/digits"
OLD_CONFIG = "max_packet_size 16777216"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


def _string(s: str) -> bytes:
    data = s.encode()
    return len(data).to_bytes(2, "big") + data


def _raw_publish(broker: BrokerInfo, topic: str, payload: bytes, *, v5: bool) -> bytes:
    """One sensor connection: CONNECT, one QoS 1 PUBLISH of ``payload``; returns the first byte
    the broker sent after its CONNACK (b"" if it closed first, or while we were sending)."""
    level, props = (5, b"\x00") if v5 else (4, b"")
    client_id = f"hostile-{uuid.uuid4().hex[:8]}"
    connect = _string("MQTT") + bytes([level, 0x02]) + (30).to_bytes(2, "big") + props
    with socket.create_connection((broker.host, broker.port), timeout=10) as sock:
        sock.sendall(_packet(0x10, connect + _string(client_id)))
        connack = sock.recv(64)
        assert connack[:1] == b"\x20", connack
        publish = _string(topic) + (1).to_bytes(2, "big") + props
        try:
            sock.sendall(_packet(0x32, publish + payload))
            return sock.recv(1)
        except OSError:  # the broker closed while we still sent: refused, unread
            return b""


def _node_env(broker: BrokerInfo, node_id: str, state: Path, protocol: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    env.update(
        EDGEWISE_NODE_ID=node_id,
        EDGEWISE_MQTT__HOST=broker.host,
        EDGEWISE_MQTT__PORT=str(broker.port),
        EDGEWISE_MQTT__PROTOCOL=protocol,
        EDGEWISE_STORAGE__STATE_DIR=str(state),
        EDGEWISE_TELEMETRY__WINDOW_S="0.5",
        EDGEWISE_LOG_LEVEL="INFO",
    )
    return env


@dataclass(frozen=True)
class Run:
    """What one run saw: the node's RSS, bytes it received, its rejects, the broker's log."""

    node_id: str
    rss: int
    peak_rss: int
    received: int
    rejected: dict[str, int]
    broker_log: str


def _peak_rss(pid: int) -> int:
    """The process's highest RSS so far (Linux: VmHWM in /proc/PID/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def _is_result(seq: int) -> Callable[[Message], bool]:
    def matches(m: Message) -> bool:
        return m.topic.endswith("/results") and any(
            r.frame_seq == seq for r in decode_results(m.payload).results
        )

    return matches


def _hostile_run(tmp_path: Path, *, protocol: str, extra_config: str = "") -> Run:
    broker = MosquittoProcess(tmp_path / "broker", extra_config=extra_config)
    info = broker.start()
    node_id = f"big-{uuid.uuid4().hex[:8]}"
    probe = MqttProbe(info)
    sensor = MqttProbe(info)
    log = open(tmp_path / "node.log", "wb")  # noqa: SIM115 - closed below
    node: subprocess.Popen[bytes] | None = None
    v5 = protocol == "5"
    try:
        probe.connect()
        probe.subscribe(f"edge/{node_id}/#")
        node = subprocess.Popen(
            [sys.executable, "-m", "edgewise.cli.app", "node"],
            env=_node_env(info, node_id, tmp_path, protocol),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        probe.wait_for(
            lambda m: m.topic.endswith("/status") and decode_status(m.payload).state == "online",
            30,
        )
        sensor.connect()
        sensor.publish(SENSOR_TOPIC, frame_bytes(1, HOLDOUT.images[1]))
        probe.wait_for(_is_result(1), 20)
        with ThreadPoolExecutor(ATTEMPTS) as pool:  # all at once: a burst, as an attack is
            hostile = [b"\x00" * FRAME_BYTES] * ATTEMPTS
            list(pool.map(lambda p: _raw_publish(info, SENSOR_TOPIC, p, v5=v5), hostile))
        # The node still serves, and whatever it was sent has been through it by now: the
        # broker delivers one subscriber's messages in order.
        sensor.publish(SENSOR_TOPIC, frame_bytes(2, HOLDOUT.images[2]))
        probe.wait_for(_is_result(2), 60)
        answered_at = time.time()
        last = probe.wait_for(
            lambda m: (
                m.topic.endswith("/telemetry")
                and decode_telemetry(m.payload).ts > answered_at + 0.1
            ),
            30,
        )[-1]
        assert last is not None
        rss = psutil.Process(node.pid).memory_info().rss
        peak = _peak_rss(node.pid)
        windows = [decode_telemetry(m.payload) for m in probe.messages if "/telemetry" in m.topic]
        received = sum(t.counts.get("bytes_received", 0) for t in windows)
        rejected: dict[str, int] = {}
        for t in windows:
            for reason, n in t.rejects.items():
                rejected[reason] = rejected.get(reason, 0) + n
        return Run(node_id, rss, peak, received, rejected, broker.log_text())
    finally:
        if node is not None:
            node.kill()
            node.wait(10)
        log.close()
        probe.close()
        sensor.close()
        broker.kill()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_20_ten_mb_frames_are_refused_by_the_shipped_broker_and_never_reach_the_node(
    tmp_path: Path, protocol: str
) -> None:
    run = _hostile_run(tmp_path, protocol=protocol)
    assert run.broker_log.count("disconnected due to oversize packet") == ATTEMPTS
    assert run.received < FRAME_BYTES // 10  # not one hostile frame's worth reached the node
    assert run.rejected.get("payload_too_large", 0) == 0
    assert run.rss <= RSS_LIMIT_BYTES, f"node RSS {run.rss / 1e6:.1f} MB"
    assert run.peak_rss <= RSS_LIMIT_BYTES, f"node peak RSS {run.peak_rss / 1e6:.1f} MB"


def test_a_node_on_mqtt5_makes_a_permissive_broker_drop_what_is_too_large_for_it(
    tmp_path: Path,
) -> None:
    run = _hostile_run(tmp_path, protocol="5", extra_config=OLD_CONFIG)
    assert "oversize packet" not in run.broker_log  # the broker took them in ...
    dropped = f"Dropping too large outgoing PUBLISH for edgewise-node-{run.node_id} ("
    assert run.broker_log.count(dropped) == ATTEMPTS
    assert run.received < FRAME_BYTES // 10  # ... and never sent them on to the node
    assert run.rejected.get("payload_too_large", 0) == 0
    assert run.rss <= RSS_LIMIT_BYTES, f"node RSS {run.rss / 1e6:.1f} MB"
    assert run.peak_rss <= RSS_LIMIT_BYTES, f"node peak RSS {run.peak_rss / 1e6:.1f} MB"


def test_control_a_node_on_mqtt311_behind_a_permissive_broker_does_receive_them(
    tmp_path: Path,
) -> None:
    """The control: nothing stops the frames here, and the counters show it (so the runs above
    prove the frames were stopped, not that the counters miss them)."""
    run = _hostile_run(tmp_path, protocol="3.1.1", extra_config=OLD_CONFIG)
    assert run.received >= ATTEMPTS * FRAME_BYTES
    assert run.rejected.get("payload_too_large", 0) == ATTEMPTS


def test_a_publish_over_the_brokers_maximum_packet_size_is_refused_here_for_good(
    start_mosquitto: BrokerFactory,
) -> None:
    """The broker names its limit in the CONNACK (MQTT 5): a packet of exactly that size goes
    out and is acknowledged, one byte more is refused before it is sent (a permanent
    ``PublishFailed``: the outbox drops it rather than resending it on every connection), and
    the connection stays up; the broker never saw an oversize packet."""
    limit = 4096
    broker = start_mosquitto("broker", extra_config=f"max_packet_size {limit}")
    info = broker.info
    topic = "test/limit/x"
    props = PublishProperties(response_topic="test/limit/reply", correlation_data=b"c" * 9)

    async def scenario() -> tuple[list[str], int]:
        config = MqttConfig(host=info.host, port=info.port)
        outcomes: list[str] = []
        async with MqttSession(config, client_id=f"limit-{uuid.uuid4().hex[:6]}") as s:
            await s.wait_connected(10)
            assert s.broker_max_packet_bytes == limit
            for qos, properties in ((1, None), (0, None), (1, props)):
                packed = b"\x00" if properties is None else properties.pack()
                fits = limit - packet_size(topic, b"", qos, packed)
                while packet_size(topic, b"x" * fits, qos, packed) > limit:
                    fits -= 1  # the remaining length takes one more byte past 127
                assert packet_size(topic, b"x" * fits, qos, packed) == limit
                for payload in (b"x" * fits, b"x" * (fits + 1)):
                    try:
                        await s.publish(topic, payload, qos=qos, properties=properties)
                        outcomes.append("sent")
                    except PublishFailed as exc:
                        permanent = not exc.transient and "maximum packet size" in str(exc)
                        outcomes.append("refused" if permanent else f"failed: {exc}")
            await s.publish(topic, b"still up")
            return outcomes, s.stats.connects

    try:
        outcomes, connects = asyncio.run(asyncio.wait_for(scenario(), 30))
        log = broker.log_text()
    finally:
        broker.kill()
    assert outcomes == ["sent", "refused"] * 3
    assert connects == 1
    assert "oversize" not in log

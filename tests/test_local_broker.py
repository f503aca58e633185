"""edgewise.local_broker: real Mosquitto from the repo config, the embedded amqtt broker, broker
URLs."""

from __future__ import annotations

import signal
import socket
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from edgewise.local_broker import (
    MQTT5_CONNACK_RETURN_CODE,
    TUNING_CONF,
    BrokerInfo,
    BrokerStartError,
    MosquittoProcess,
    MqttProbe,
    ProbeError,
    accepts_mqtt,
    free_port,
    live_processes,
    mqtt_ping,
    parse_broker,
    parse_broker_url,
    read_tuning,
    write_mosquitto_config,
)

ProbeFactory = Callable[..., MqttProbe]

REPO = Path(__file__).resolve().parents[1]
REPO_TUNING = REPO / "compose" / "mosquitto" / "conf.d" / "tuning.conf"

# More than mosquitto's default max_queued_messages (1000), which would drop the rest.
QUEUED = 1500


def _topic(prefix: str) -> str:
    return f"edgewise/test/{prefix}/{uuid.uuid4().hex[:12]}"


# -- Mosquitto from the repo config -----------------------------------------------------


def test_mosquitto_runs_repo_config_on_free_loopback_port(
    mosquitto: BrokerInfo, mosquitto_process: MosquittoProcess
) -> None:
    assert mosquitto.kind == "mosquitto"
    assert mosquitto.host == "127.0.0.1"
    assert mosquitto.port != 1883
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert mosquitto_process.running

    config = mosquitto_process.config_path.read_text().splitlines()
    assert f"listener {mosquitto.port} 127.0.0.1" in config
    assert "allow_anonymous true" in config
    assert "persistence false" in config
    include = [line.split(" ", 1)[1] for line in config if line.startswith("include_dir ")]
    assert len(include) == 1
    conf_d = Path(include[0])
    # Only the tuning file is in the include_dir, and it is the repo's file verbatim.
    assert sorted(p.name for p in conf_d.iterdir()) == ["tuning.conf"]
    assert (conf_d / "tuning.conf").read_bytes() == REPO_TUNING.read_bytes()
    assert TUNING_CONF.read_bytes() == REPO_TUNING.read_bytes()


def test_qos1_round_trip_through_mosquitto(mosquitto: BrokerInfo, mqtt_probe: ProbeFactory) -> None:
    topic = _topic("roundtrip")
    sub = mqtt_probe()
    pub = mqtt_probe()
    assert sub.client_id != pub.client_id
    assert sub.subscribe(f"{topic}/#", qos=1) == 1

    pub.publish(f"{topic}/a", b"\x00payload\xff", qos=1)
    [msg] = sub.wait_for(lambda m: m.topic == f"{topic}/a", timeout_s=5)
    assert msg.payload == b"\x00payload\xff"
    assert msg.qos == 1
    assert msg.retain is False
    assert msg.properties is None  # MQTT 3.1.1 session


def test_retained_message_reaches_late_subscriber_with_retain_flag(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    topic = _topic("retain")
    mqtt_probe().publish(topic, b"last-known", qos=1, retain=True)
    late = mqtt_probe()
    late.subscribe(topic, qos=1)
    [msg] = late.wait_for(lambda m: m.topic == topic, timeout_s=5)
    assert (msg.payload, msg.retain) == (b"last-known", True)


def test_mqtt5_probe_gets_properties(mosquitto: BrokerInfo, mqtt_probe: ProbeFactory) -> None:
    topic = _topic("v5")
    sub = mqtt_probe(protocol=MQTTProtocolVersion.MQTTv5)
    sub.subscribe(topic, qos=1)
    mqtt_probe(protocol=MQTTProtocolVersion.MQTTv5).publish(topic, b"five", qos=1)
    [msg] = sub.wait_for(lambda m: m.topic == topic, timeout_s=5)
    assert msg.payload == b"five"
    assert msg.properties is not None


def test_probe_socket_has_tcp_nodelay(mosquitto: BrokerInfo, mqtt_probe: ProbeFactory) -> None:
    probe = mqtt_probe()
    assert probe.socket is not None
    assert probe.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def _deliver_to_offline_subscriber(
    broker: BrokerInfo, mqtt_probe: ProbeFactory, count: int
) -> list[bytes]:
    """Queue ``count`` QoS 1 messages for an offline persistent session, reconnect it, and
    return what it received before an end marker published after the reconnect."""
    topic = _topic("queue")
    client_id = f"queue-sub-{uuid.uuid4().hex[:12]}"
    sub = mqtt_probe(broker, client_id, clean_session=False)
    sub.subscribe(topic, qos=1)
    sub.close()

    pub = mqtt_probe(broker)
    pub.publish_many(topic, [str(i).encode() for i in range(count)], qos=1, timeout_s=60)

    again = mqtt_probe(broker, client_id, clean_session=False, connect=False)
    assert again.connect() is True, "persistent session was not kept"
    # The broker sends the queued messages before anything published after the reconnect,
    # so the marker's arrival means the queue has been delivered in full.
    pub.publish(topic, b"END", qos=1)
    again.wait_for(lambda m: m.topic == topic and m.payload == b"END", timeout_s=60)
    received = [m for m in again.messages if m.topic == topic]
    assert received[-1].payload == b"END"
    return [m.payload for m in received[:-1]]


def test_tuning_keeps_more_than_1000_queued_qos1_messages(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    assert int(read_tuning()["max_queued_messages"]) > QUEUED
    payloads = _deliver_to_offline_subscriber(mosquitto, mqtt_probe, QUEUED)
    assert len(payloads) == QUEUED
    assert payloads == [str(i).encode() for i in range(QUEUED)]


def test_default_queue_limit_would_drop_messages(tmp_path: Path, mqtt_probe: ProbeFactory) -> None:
    """Control for the test above: with mosquitto's default limit (1000) put back after the
    tuning, the same procedure loses messages, so that test really measures the tuning."""
    with MosquittoProcess(tmp_path, extra_config="max_queued_messages 1000") as proc:
        payloads = _deliver_to_offline_subscriber(proc.info, mqtt_probe, QUEUED)
    assert len(payloads) < QUEUED


def test_broker_log_shows_tuning_file_loaded(mosquitto_process: MosquittoProcess) -> None:
    log = mosquitto_process.log_text()
    conf_d = mosquitto_process.workdir / "conf.d"
    assert f"Loading config file {conf_d / 'tuning.conf'}" in log
    assert f"Config loaded from {mosquitto_process.config_path}" in log
    assert "Error" not in log


# -- lifecycle: restart, kill, failures ------------------------------------------------


def test_restart_keeps_port_and_clients_reconnect(
    fresh_mosquitto: MosquittoProcess, mqtt_probe: ProbeFactory
) -> None:
    before = fresh_mosquitto.info
    old_pid = fresh_mosquitto.pid
    probe = mqtt_probe(before)

    after = fresh_mosquitto.restart()
    assert after == before
    assert fresh_mosquitto.running
    assert fresh_mosquitto.pid not in (None, old_pid)
    assert mqtt_ping(after.host, after.port) == 0

    probe.wait_connected(timeout_s=15, count=2)  # paho reconnected to the same address
    topic = _topic("restart")
    probe.subscribe(topic)
    probe.publish(topic, b"after-restart")
    probe.wait_for(lambda m: m.payload == b"after-restart", timeout_s=5)


def test_kill_makes_connected_client_see_disconnect(
    fresh_mosquitto: MosquittoProcess, mqtt_probe: ProbeFactory
) -> None:
    info = fresh_mosquitto.info
    probe = mqtt_probe(info)
    assert probe.connected

    fresh_mosquitto.kill()
    event = probe.wait_disconnected(timeout_s=5)
    assert event.from_server is False  # socket dropped, no DISCONNECT packet
    assert event.reason.is_failure
    assert not fresh_mosquitto.running
    assert fresh_mosquitto.pid is None
    assert fresh_mosquitto.returncode == -signal.SIGKILL
    assert not accepts_mqtt(info.host, info.port)
    assert fresh_mosquitto not in live_processes()


def test_stop_is_graceful_and_idempotent(tmp_path: Path) -> None:
    proc = MosquittoProcess(tmp_path)
    try:
        info = proc.start()
        proc.stop()
        assert proc.returncode == 0  # exited on SIGTERM, not killed
        proc.stop()
        proc.kill()
        assert not accepts_mqtt(info.host, info.port)
        assert "terminating" in proc.log_text()
    finally:
        proc.kill()


def test_start_failure_raises_with_log_tail(tmp_path: Path) -> None:
    proc = MosquittoProcess(tmp_path, extra_config="no_such_option 1")
    with pytest.raises(BrokerStartError, match="no_such_option") as err:
        proc.start(timeout_s=5)
    assert "mosquitto exited" in str(err.value)
    assert not proc.running


def test_fixed_port_in_use_is_reported(fresh_mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    clash = MosquittoProcess(tmp_path / "clash", port=fresh_mosquitto.info.port)
    with pytest.raises(BrokerStartError, match="in use"):
        clash.start(timeout_s=5)
    assert not clash.running
    assert fresh_mosquitto.running


def test_port_lost_between_check_and_bind_is_detected(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when the pre-start check misses the clash, the other broker's CONNACK is not taken
    for ours: start() waits for its own broker's "running" line and sees it exit instead."""
    import edgewise.local_broker.mosquitto as mosq

    monkeypatch.setattr(mosq, "_port_answers", lambda port: False)
    clash = MosquittoProcess(tmp_path / "clash", port=fresh_mosquitto.info.port)
    with pytest.raises(BrokerStartError, match="in use") as err:
        clash.start(timeout_s=5)
    assert "Address already in use" in str(err.value)
    assert not clash.running


def test_auto_port_retries_when_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgewise.local_broker.mosquitto as mosq

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        ports = iter([taken])
        monkeypatch.setattr(mosq, "free_port", lambda: next(ports, None) or free_port())
        with MosquittoProcess(tmp_path) as proc:
            assert proc.info.port != taken
            assert mqtt_ping(proc.info.host, proc.info.port) == 0


def test_write_mosquitto_config_lets_extra_enable_persistence(tmp_path: Path) -> None:
    stale = tmp_path / "conf.d" / "stale.conf"
    stale.parent.mkdir()
    stale.write_text("max_queued_messages 1\n")
    extra = f"persistence true\npersistence_location {tmp_path}/"
    path = write_mosquitto_config(tmp_path, 12345, extra=extra)
    lines = path.read_text().splitlines()
    assert "persistence false" not in lines
    assert lines[-2:] == extra.splitlines()  # extra comes last, after the include
    assert sorted(p.name for p in (tmp_path / "conf.d").iterdir()) == ["tuning.conf"]


# -- embedded amqtt broker -------------------------------------------------------------


def test_embedded_broker_qos1_round_trip_mqtt311(
    embedded_broker: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    assert embedded_broker.kind == "embedded"
    assert embedded_broker.host == "127.0.0.1"
    topic = _topic("embedded")
    sub = mqtt_probe(embedded_broker, protocol=MQTTProtocolVersion.MQTTv311)
    pub = mqtt_probe(embedded_broker, protocol=MQTTProtocolVersion.MQTTv311)
    assert sub.subscribe(topic, qos=1) == 1
    pub.publish(topic, b"hello-amqtt", qos=1)
    [msg] = sub.wait_for(lambda m: m.topic == topic, timeout_s=5)
    assert (msg.payload, msg.qos, msg.retain) == (b"hello-amqtt", 1, False)


def test_embedded_broker_refuses_mqtt5_with_connack_then_drops_socket(
    embedded_broker: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    """What paho sees: on_connect with CONNACK reason 132 "Unsupported protocol version"
    (amqtt sends a 3.1.1 CONNACK with return code 1; paho maps it), then on_disconnect for a
    dropped socket (no DISCONNECT packet)."""
    probe = mqtt_probe(embedded_broker, protocol=MQTTProtocolVersion.MQTTv5, connect=False)
    with pytest.raises(ProbeError, match="Unsupported protocol version"):
        probe.connect()
    reason, session_present = probe.connacks[0]
    assert reason.value == 132
    assert reason.getName() == "Unsupported protocol version"
    assert reason.is_failure
    assert session_present is False
    event = probe.wait_disconnected(timeout_s=5)
    assert event.from_server is False


def _mqtt5_connect_packet(client_id: bytes) -> bytes:
    variable = b"\x00\x04MQTT" + bytes([5, 0x02]) + struct.pack("!H", 30) + b"\x00"
    body = variable + struct.pack("!H", len(client_id)) + client_id
    return bytes([0x10, len(body)]) + body


def test_embedded_broker_mqtt5_wire_response(embedded_broker: BrokerInfo) -> None:
    """On the wire: a 4-byte MQTT 3.1.1 CONNACK (return code 1), then the socket closes."""
    with socket.create_connection((embedded_broker.host, embedded_broker.port), timeout=5) as s:
        s.sendall(_mqtt5_connect_packet(b"wire-v5"))
        data = b""
        while chunk := s.recv(64):
            data += chunk
    assert data == bytes([0x20, 0x02, 0x00, MQTT5_CONNACK_RETURN_CODE])


def test_embedded_broker_accepts_mqtt311_ping(embedded_broker: BrokerInfo) -> None:
    assert mqtt_ping(embedded_broker.host, embedded_broker.port) == 0


# -- URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1883", ("127.0.0.1", 1883)),
        ("mqtt://localhost", ("localhost", 1883)),
        ("mqtt://broker.example:8883", ("broker.example", 8883)),
        ("mqtt://broker.example:8883/", ("broker.example", 8883)),
        ("MQTT://Host:1", ("host", 1)),
        ("mqtt://[::1]:1884", ("::1", 1884)),
        ("  mqtt://127.0.0.1:65535\n", ("127.0.0.1", 65535)),
    ],
)
def test_parse_broker_url_accepts(url: str, expected: tuple[str, int]) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("127.0.0.1:1883", "no scheme"),
        ("localhost", "no scheme"),
        ("", "no scheme"),
        ("mqtts://host:8883", "scheme 'mqtts'"),
        ("tcp://host:1883", "scheme 'tcp'"),
        ("ws://host:9001", "scheme 'ws'"),
        ("mqtt://", "no host"),
        ("mqtt://:1883", "no host"),
        ("mqtt://host:", "empty port"),
        ("mqtt://host:abc", "invalid port"),
        ("mqtt://host:70000", "invalid port"),
        ("mqtt://host:0", "outside 1-65535"),
        ("mqtt://user:pw@host:1883", "credentials"),
        ("mqtt://host:1883/topic", "path"),
        ("mqtt://host:1883?x=1", "query"),
    ],
)
def test_parse_broker_url_rejects(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match="broker URL") as err:
        parse_broker_url(url)
    assert problem in str(err.value)


@pytest.mark.parametrize(
    "url",
    ["mqtt://op:s3cret-pw@host:1883", "mqtts://op:s3cret-pw@host", "op:s3cret-pw@host:1883",
     "mqtt://op:s3cret-pw@host:99999", "mqtt://op:s3cret-pw@host/x"],
)  # fmt: skip
def test_a_refused_url_never_shows_its_password(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL") as err:
        parse_broker_url(url)
    assert "s3cret-pw" not in str(err.value)
    assert "***@host" in str(err.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.example", ("broker.example", 1883, False)),
        ("mqtts://broker.example", ("broker.example", 8883, True)),
        ("mqtts://broker.example:18883", ("broker.example", 18883, True)),
        ("MQTTS://[::1]", ("::1", 8883, True)),
    ],
)
def test_parse_broker_takes_mqtts_with_its_own_default_port(
    url: str, expected: tuple[str, int, bool]
) -> None:
    got = parse_broker(url)
    assert (got.host, got.port, got.tls) == expected
    assert parse_broker(got.url) == got


@pytest.mark.parametrize(
    ("url", "problem"),
    [("tcp://host", "scheme 'tcp'; expected mqtt://host[:port] or mqtts://host[:port]"),
     ("mqtts://op:s3cret-pw@host", "credentials"), ("mqtts://host:0", "outside 1-65535")],
)  # fmt: skip
def test_parse_broker_refuses_other_urls_without_showing_a_password(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match="broker URL") as err:
        parse_broker(url)
    assert problem in str(err.value) and "s3cret-pw" not in str(err.value)


def test_broker_info_url_round_trips() -> None:
    info = BrokerInfo.from_url("mqtt://[::1]:1884")
    assert info == BrokerInfo("::1", 1884, "external")
    assert info.url == "mqtt://[::1]:1884"
    assert BrokerInfo("127.0.0.1", 1883, "embedded").url == "mqtt://127.0.0.1:1883"
    assert parse_broker_url(BrokerInfo("10.1.2.3", 1999, "external").url) == ("10.1.2.3", 1999)


def test_a_cut_refuses_a_connection_whose_upstream_was_still_being_opened(
    mosquitto: BrokerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cut made while the proxy was still connecting upstream for a client must refuse that
    client too: a cut that lets one connection through never makes the node see its uplink go."""
    import asyncio
    import threading

    from edgewise.local_broker import TcpProxy, tcpproxy

    started, go = threading.Event(), threading.Event()
    real_open = asyncio.open_connection

    async def slow_open(*args: Any, **kwargs: Any) -> Any:
        started.set()
        await asyncio.to_thread(go.wait, 10)
        return await real_open(*args, **kwargs)

    monkeypatch.setattr(tcpproxy.asyncio, "open_connection", slow_open)
    with TcpProxy(mosquitto.host, mosquitto.port) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        try:
            assert started.wait(10), "the proxy never began its upstream connection"
            proxy.cut()
            go.set()
            try:
                got = client.recv(1)
            except ConnectionResetError:
                got = b""
            assert got == b"", "the cut let a connection through"
            assert proxy.connections_accepted == 0
            assert proxy.connections_refused == 1
        finally:
            client.close()

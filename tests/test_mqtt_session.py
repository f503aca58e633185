"""edgewise.mqtt.MqttSession against real brokers: protocol choice, publish acknowledgements,
broker crashes and restarts, persistent sessions with manual ack, Receive Maximum, TCP_NODELAY,
and the reconnect backoff.

Every scenario runs in ``asyncio.run`` under an ``asyncio.timeout``; nothing sleeps to let time
pass: the tests await futures, ``wait_connected`` and events set from the session's callbacks.
Blocking calls that take a while (broker restarts, probes waiting for messages) run in threads
so the session's event loop keeps serving its socket meanwhile.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import termios
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgewise.local_broker import BrokerInfo, MosquittoProcess, MqttProbe, ProbeError
from edgewise.mqtt import (
    ConnectInfo,
    Disconnected,
    Inbound,
    MqttConfig,
    MqttSession,
)
from edgewise.mqtt.socket_driver import READS_PER_WAKEUP
from tests.conftest import BrokerFactory
from tests.waiting import eventually

ProbeFactory = Callable[..., MqttProbe]

SCENARIO_TIMEOUT_S = 30.0


# -- helpers ---------------------------------------------------------------------------------
def _uid() -> str:
    return uuid.uuid4().hex[:12]


def _topic(name: str) -> str:
    return f"test/mqtt-session/{name}/{_uid()}"


def _client_id(name: str) -> str:
    return f"test-session-{name}-{_uid()}"


def _config(broker: BrokerInfo, **overrides: Any) -> MqttConfig:
    """Small reconnect delays, so that reconnect tests are quick."""
    settings: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "connect_timeout_s": 5.0,
        "reconnect_first_s": 0.1,
        "reconnect_cap_s": 0.5,
    }
    settings.update(overrides)
    return MqttConfig(**settings)


class Inbox:
    """``on_message`` handler that records messages and lets a test await one.

    With ``ack_with`` set, every message is acknowledged as soon as it arrives.
    """

    def __init__(self) -> None:
        self.messages: list[Inbound] = []
        self.ack_with: MqttSession | None = None
        self._changed = asyncio.Event()

    def __call__(self, msg: Inbound) -> None:
        self.messages.append(msg)
        if self.ack_with is not None:
            self.ack_with.ack(msg)
        self._changed.set()

    def payloads(self, topic: str) -> list[bytes]:
        return [m.payload for m in self.messages if m.topic == topic]

    async def wait_for(self, topic: str, payload: bytes) -> Inbound:
        while True:
            for msg in self.messages:
                if msg.topic == topic and msg.payload == payload:
                    return msg
            self._changed.clear()
            await self._changed.wait()


class Connects:
    """``on_connect`` hook that records every ConnectInfo (it runs after any re-subscribe)."""

    def __init__(self) -> None:
        self.infos: list[ConnectInfo] = []
        self._changed = asyncio.Event()

    async def __call__(self, info: ConnectInfo) -> None:
        self.infos.append(info)
        self._changed.set()

    async def wait_count(self, n: int) -> ConnectInfo:
        """Wait until the ``n``-th connection is set up; return its ConnectInfo."""
        while len(self.infos) < n:
            self._changed.clear()
            await self._changed.wait()
        return self.infos[n - 1]


async def _round_trip(session: MqttSession) -> None:
    """A QoS 1 publish and its PUBACK: the broker handles one connection's packets in order, so
    everything the session sent before (e.g. PUBACKs of received messages) has been handled."""
    await session.publish(_topic("barrier"), b"barrier")


def _probe_wait(probe: MqttProbe, topic: str, payload: bytes) -> None:
    probe.wait_for(lambda m: m.topic == topic and m.payload == payload, timeout_s=10)


def _log_shows_protocol(log: str, client_id: str, protocol_tag: str) -> bool:
    """Mosquitto logs ``... as CLIENT_ID (p5, c0, k30)``: p5 = MQTT 5, p2 = MQTT 3.1.1."""
    return f" as {client_id} ({protocol_tag}," in log


# -- 1, 2: protocol selection ----------------------------------------------------------------
def test_auto_protocol_falls_back_to_311_on_embedded_broker(embedded_broker: BrokerInfo) -> None:
    """amqtt never answers paho's MQTT 5 CONNECT (NoConnack); one MQTT 3.1.1 try works."""
    topic = _topic("amqtt")

    async def scenario() -> None:
        inbox = Inbox()
        connects = Connects()
        config = _config(embedded_broker, connect_timeout_s=1.0)
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(
                config, client_id=_client_id("amqtt"), on_message=inbox, on_connect=connects
            ) as session:
                session.subscribe(topic)
                info = await connects.wait_count(1)
                assert session.connected
                assert session.protocol == "3.1.1"
                assert info.protocol == "3.1.1"
                assert session.broker_receive_maximum == 65535  # no MQTT 5 CONNACK properties
                # The connection really works both ways.
                await session.publish(topic, b"over-311")
                await inbox.wait_for(topic, b"over-311")
                assert session.stats.connects == 1

    asyncio.run(scenario())


def test_auto_protocol_is_mqtt5_on_mosquitto(
    mosquitto: BrokerInfo, mosquitto_process: MosquittoProcess
) -> None:
    client_id = _client_id("auto5")

    async def scenario() -> None:
        connects = Connects()
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(
                _config(mosquitto), client_id=client_id, on_connect=connects
            ) as session:
                info = await connects.wait_count(1)
                assert session.protocol == "5"
                assert info.protocol == "5"
                assert session.stats.connect_failures == 0

    asyncio.run(scenario())
    assert _log_shows_protocol(mosquitto_process.log_text(), client_id, "p5")


def test_explicit_mqtt311_on_mosquitto(
    mosquitto: BrokerInfo, mosquitto_process: MosquittoProcess
) -> None:
    client_id = _client_id("v311")
    topic = _topic("v311")

    async def scenario() -> None:
        inbox = Inbox()
        connects = Connects()
        config = _config(mosquitto, protocol="3.1.1")
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(
                config, client_id=client_id, on_message=inbox, on_connect=connects
            ) as session:
                session.subscribe(topic)
                info = await connects.wait_count(1)
                assert session.protocol == "3.1.1"
                assert info.protocol == "3.1.1"
                await session.publish(topic, b"plain-311")
                msg = await inbox.wait_for(topic, b"plain-311")
                assert msg.qos == 1

    asyncio.run(scenario())
    # What went over the wire, as the broker saw it.
    log = mosquitto_process.log_text()
    assert _log_shows_protocol(log, client_id, "p2")
    assert not _log_shows_protocol(log, client_id, "p5")


def test_silent_server_keeps_mqtt5_after_a_failed_311_trial(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server that accepts TCP and never answers: the MQTT 3.1.1 try after the MQTT 5 silence
    fails too, so the session goes back to MQTT 5 (it keeps 3.1.1 only when 3.1.1 works)."""
    caplog.set_level(logging.WARNING, logger="edgewise.mqtt.session")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)  # the kernel completes handshakes; nobody ever reads
        broker = BrokerInfo(host="127.0.0.1", port=server.getsockname()[1], kind="external")

        async def scenario() -> None:
            config = _config(broker, connect_timeout_s=0.3)
            async with asyncio.timeout(SCENARIO_TIMEOUT_S):
                async with MqttSession(config, client_id=_client_id("silent")) as session:
                    await eventually(lambda: session._client is not None, "a connect attempt")
                    # CONNECT sent, no CONNACK: not connected, so a publish fails at once.
                    fut = session.publish_nowait(_topic("silent"), b"too-early")
                    assert fut.done() and isinstance(fut.exception(), Disconnected)
                    await eventually(lambda: session.stats.connect_failures >= 2, "2 failures")
                    assert not session.connected
                    assert session.protocol == "5"
                    assert session.last_error is not None
                    assert "CONNACK" in session.last_error

        asyncio.run(scenario())
    trials = [r for r in caplog.records if "trying MQTT 3.1.1" in r.getMessage()]
    assert len(trials) >= 2  # MQTT 3.1.1 was tried in each round, and dropped again


class _HangUpServer:
    """Accepts TCP connections and closes them at once, before any CONNACK (like a proxy whose
    broker is down, or a broker shutting down)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def test_connection_closed_before_connack_does_not_downgrade_for_good(tmp_path: Path) -> None:
    """A socket closed before any CONNACK is no protocol refusal: after such an outage the session
    speaks MQTT 5 to the Mosquitto that then answers on that port (not MQTT 3.1.1 forever)."""
    server = _HangUpServer()
    broker = BrokerInfo(host="127.0.0.1", port=server.port, kind="external")
    mosquitto = MosquittoProcess(tmp_path / "mosquitto", port=server.port)

    async def scenario() -> None:
        config = _config(broker, connect_timeout_s=1.0)
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(config, client_id=_client_id("hangup")) as session:
                await eventually(lambda: session.stats.connect_failures >= 2, "2 failures")
                await asyncio.to_thread(server.close)
                failures = session.stats.connect_failures
                # One more failure (a refused connect): no MQTT 3.1.1 try is under way any more.
                await eventually(
                    lambda: session.stats.connect_failures > failures, "a refused connect"
                )
                assert session.protocol == "5"
                await asyncio.to_thread(mosquitto.start)
                await session.wait_connected()
                assert session.protocol == "5"

    try:
        asyncio.run(scenario())
    finally:
        server.close()
        mosquitto.kill()


# -- 3: publish ------------------------------------------------------------------------------
def test_publish_qos1_resolves_at_puback_and_reaches_subscriber(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    topic = _topic("publish")
    probe = mqtt_probe(mosquitto)
    probe.subscribe(topic, qos=1)

    async def scenario() -> None:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(_config(mosquitto), client_id=_client_id("pub")) as session:
                await session.wait_connected()
                fut = session.publish_nowait(topic, b"payload-1", qos=1)
                assert not fut.done()  # nothing is written before the loop runs
                await fut
                assert fut.result() is None
                await asyncio.to_thread(_probe_wait, probe, topic, b"payload-1")

    asyncio.run(scenario())
    [msg] = [m for m in probe.messages if m.topic == topic]
    assert (msg.payload, msg.qos, msg.retain) == (b"payload-1", 1, False)


def test_publish_nowait_fails_at_once_while_disconnected(fresh_mosquitto: MosquittoProcess) -> None:
    broker = fresh_mosquitto.info
    topic = _topic("offline")

    async def scenario() -> None:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(_config(broker), client_id=_client_id("offline")) as session:
                await session.wait_connected()
                fresh_mosquitto.kill()
                await session.wait_disconnected()
                assert not session.connected
                fut = session.publish_nowait(topic, b"nowhere")
                assert fut.done()  # at once: no waiting for a connection
                assert isinstance(fut.exception(), Disconnected)
                with pytest.raises(Disconnected):
                    await session.publish(topic, b"nowhere-either")

    asyncio.run(scenario())


# -- 4: broker crash and restart -------------------------------------------------------------
def test_broker_crash_fails_pending_publishes_then_session_reconnects(
    fresh_mosquitto: MosquittoProcess, mqtt_probe: ProbeFactory
) -> None:
    broker = fresh_mosquitto.info
    topic = _topic("crash")

    async def scenario() -> None:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(_config(broker), client_id=_client_id("crash")) as session:
                await session.wait_connected()
                await session.publish(topic, b"before")
                assert (session.stats.connects, session.stats.reconnects) == (1, 0)
                first_connection = session.connection

                # Queued, not yet written (the loop has not run): the broker dies first, so no
                # PUBACK can ever come. An awaiting task and bare futures must all fail.
                queued = [session.publish_nowait(topic, b"lost-%d" % i) for i in range(5)]
                awaiting = asyncio.create_task(session.publish(topic, b"lost-awaited"))
                fresh_mosquitto.kill()
                results = await asyncio.gather(*queued, awaiting, return_exceptions=True)
                assert all(isinstance(r, Disconnected) for r in results), results
                assert not session.connected

                await asyncio.to_thread(fresh_mosquitto.restart)  # same port
                await session.wait_connected()
                assert session.connection > first_connection
                assert session.stats.connects == 2
                assert session.stats.reconnects == 1
                assert session.protocol == "5"

                probe = await asyncio.to_thread(mqtt_probe, broker)
                await asyncio.to_thread(probe.subscribe, topic, 1)
                await session.publish(topic, b"after")
                await asyncio.to_thread(_probe_wait, probe, topic, b"after")

    asyncio.run(scenario())


def test_publish_awaited_in_on_connect_fails_when_connection_drops(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    """The edge node publishes its status from ``on_connect`` and awaits the PUBACK. If the
    connection drops right then, that publish must fail with Disconnected (not hang the
    connection loop) and the session must come back once the broker does."""
    broker = fresh_mosquitto.info
    topic = _topic("hook")

    async def scenario() -> None:
        outcomes: list[BaseException | None] = []
        ready = asyncio.Event()

        async def on_connect(info: ConnectInfo) -> None:
            fut = session.publish_nowait(topic, b"status", retain=True)
            if info.connection == 1:
                fresh_mosquitto.kill()  # before the PUBLISH is even written
            try:
                await fut
            except Disconnected as exc:
                outcomes.append(exc)
                raise
            else:
                outcomes.append(None)
            finally:
                ready.set()

        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            session = MqttSession(
                _config(broker), client_id=_client_id("hook"), on_connect=on_connect
            )
            async with session:
                await ready.wait()
                assert len(outcomes) == 1 and isinstance(outcomes[0], Disconnected)
                ready.clear()
                await asyncio.to_thread(fresh_mosquitto.restart)
                await ready.wait()
                assert outcomes[1:] == [None]
                assert session.connected
                assert session.stats.reconnects == 1

    asyncio.run(scenario())


def test_broker_crash_while_resubscribing_does_not_stop_reconnects(
    fresh_mosquitto: MosquittoProcess, mqtt_probe: ProbeFactory
) -> None:
    """The connection drops between SUBSCRIBE and SUBACK: the session must still come back and
    subscribe once the broker is up again."""
    broker = fresh_mosquitto.info
    topic = _topic("subcrash")

    async def scenario() -> None:
        inbox = Inbox()
        connects = Connects()
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            session = MqttSession(
                _config(broker),
                client_id=_client_id("subcrash"),
                on_message=inbox,
                on_connect=connects,
            )
            send_subscribe = session._send_subscribe
            crashed: list[int] = []
            crash = asyncio.Event()

            def send_then_crash(subs: list[Any]) -> Any:
                fut = send_subscribe(subs)
                if not crashed:
                    crashed.append(session.connection)
                    fresh_mosquitto.kill()  # before the SUBSCRIBE is even written
                    crash.set()
                return fut

            session._send_subscribe = send_then_crash  # type: ignore[method-assign]
            session.subscribe(topic)
            async with session:
                await crash.wait()
                await asyncio.to_thread(fresh_mosquitto.restart)
                info = await connects.wait_count(1)  # after the SUBACK
                assert info.connection > crashed[0]
                probe = await asyncio.to_thread(mqtt_probe, broker)
                await asyncio.to_thread(probe.publish, topic, b"subscribed")
                await inbox.wait_for(topic, b"subscribed")

    asyncio.run(scenario())


# -- 5: Session Present = 0 ------------------------------------------------------------------
def test_session_resubscribes_when_broker_lost_the_session(
    fresh_mosquitto: MosquittoProcess, mqtt_probe: ProbeFactory
) -> None:
    broker = fresh_mosquitto.info
    topic = _topic("resub")

    async def scenario() -> None:
        inbox = Inbox()
        connects = Connects()
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(
                _config(broker),
                client_id=_client_id("resub"),
                on_message=inbox,
                on_connect=connects,
            ) as session:
                session.subscribe(topic)
                first = await connects.wait_count(1)  # on_connect runs after the SUBACK
                assert first.session_present is False
                probe = await asyncio.to_thread(mqtt_probe, broker)
                await asyncio.to_thread(probe.publish, topic, b"before-restart")
                await inbox.wait_for(topic, b"before-restart")

                # No persistence: the restarted broker knows nothing of our session.
                await asyncio.to_thread(fresh_mosquitto.restart)
                second = await connects.wait_count(2)
                assert second.session_present is False
                assert second.connection > first.connection
                late = await asyncio.to_thread(mqtt_probe, broker)
                await asyncio.to_thread(late.publish, topic, b"after-restart")
                msg = await inbox.wait_for(topic, b"after-restart")
                assert msg.connection == second.connection
                assert session.stats.reconnects == 1

    asyncio.run(scenario())


@pytest.fixture
def persistent_mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A Mosquitto of the test's own that saves sessions and retained messages on SIGTERM."""
    workdir = tmp_path / "persistent-mosquitto"
    db_dir = workdir / "db"
    db_dir.mkdir(parents=True)
    proc = MosquittoProcess(
        workdir, extra_config=f"persistence true\npersistence_location {db_dir}/"
    )
    try:
        proc.start()
        yield proc
    finally:
        proc.kill()


def test_session_present_keeps_subscriptions_without_resubscribing(
    persistent_mosquitto: MosquittoProcess, mqtt_probe: ProbeFactory
) -> None:
    """After a broker restart that kept the session, the session does not subscribe again:
    a re-subscribe would replay the retained message, which is observable."""
    broker = persistent_mosquitto.info
    topic = _topic("present")
    probe = mqtt_probe(broker)
    probe.publish(topic, b"retained", retain=True)

    async def scenario() -> None:
        inbox = Inbox()
        connects = Connects()
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(
                _config(broker),
                client_id=_client_id("present"),
                on_message=inbox,
                on_connect=connects,
            ) as session:
                inbox.ack_with = session
                session.subscribe(topic)
                await connects.wait_count(1)
                first = await inbox.wait_for(topic, b"retained")
                assert first.retain is True
                await _round_trip(session)  # our PUBACK for it is handled, not saved in flight

                await asyncio.to_thread(persistent_mosquitto.restart)  # SIGTERM saves the db
                second = await connects.wait_count(2)
                assert second.session_present is True
                late = await asyncio.to_thread(mqtt_probe, broker)
                await asyncio.to_thread(late.publish, topic, b"marker")
                await inbox.wait_for(topic, b"marker")
                # Same publisher, same subscriber: a replayed retained copy would come first.
                got = [(m.payload, m.retain, m.dup) for m in inbox.messages if m.topic == topic]
                assert got == [(b"retained", True, False), (b"marker", False, False)]

    asyncio.run(scenario())


def test_subscription_added_while_disconnected_reaches_a_present_session(
    persistent_mosquitto: MosquittoProcess, mqtt_probe: ProbeFactory
) -> None:
    """``subscribe`` while the broker is away must still be sent on the next connection, even
    when the broker kept the session (Session Present = 1) and nothing else is re-subscribed."""
    broker = persistent_mosquitto.info
    old_topic = _topic("kept")
    new_topic = _topic("added")

    async def scenario() -> None:
        inbox = Inbox()
        connects = Connects()
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(
                _config(broker),
                client_id=_client_id("added"),
                on_message=inbox,
                on_connect=connects,
            ) as session:
                inbox.ack_with = session
                session.subscribe(old_topic)
                await connects.wait_count(1)

                await asyncio.to_thread(persistent_mosquitto.stop)
                await session.wait_disconnected()
                session.subscribe(new_topic)
                await asyncio.to_thread(persistent_mosquitto.start)
                second = await connects.wait_count(2)
                assert second.session_present is True

                probe = await asyncio.to_thread(mqtt_probe, broker)
                await asyncio.to_thread(probe.publish, new_topic, b"new")
                await asyncio.to_thread(probe.publish, old_topic, b"old")
                await inbox.wait_for(old_topic, b"old")
                await inbox.wait_for(new_topic, b"new")

    asyncio.run(scenario())


# -- 6: persistent session and manual ack ----------------------------------------------------
def test_unacked_message_is_redelivered_to_persistent_session_and_acked_one_is_not(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    topic = _topic("ack")
    client_id = _client_id("ack")
    publisher = mqtt_probe(mosquitto)

    async def run_session(*, ack: bool, send: list[bytes], until: bytes) -> Inbox:
        """Connect as ``client_id`` (persistent), publish ``send`` once the session is set up,
        and return what arrived up to and including ``until``."""
        inbox = Inbox()
        connects = Connects()
        async with MqttSession(
            _config(mosquitto),
            client_id=client_id,
            on_message=inbox,
            on_connect=connects,
            persistent=True,
        ) as session:
            if ack:
                inbox.ack_with = session
            session.subscribe(topic)
            await connects.wait_count(1)
            for payload in send:
                await asyncio.to_thread(publisher.publish, topic, payload)
            await inbox.wait_for(topic, until)
        return inbox

    async def scenario() -> None:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            # 1. Receive "job" and leave without acknowledging it.
            first = await run_session(ack=False, send=[b"job"], until=b"job")
            assert first.payloads(topic) == [b"job"]
            assert first.messages[0].dup is False
            # 2. Same client id: the broker redelivers "job" (before "marker-1", published
            #    after the reconnect); this time it is acknowledged.
            second = await run_session(ack=True, send=[b"marker-1"], until=b"marker-1")
            assert second.payloads(topic) == [b"job", b"marker-1"]
            redelivered = second.messages[0]
            assert (redelivered.qos, redelivered.dup) == (1, True)
            # 3. Acknowledged: nothing comes back before "marker-2".
            third = await run_session(ack=True, send=[b"marker-2"], until=b"marker-2")
            assert third.payloads(topic) == [b"marker-2"]

    asyncio.run(scenario())


# -- 7: TCP_NODELAY --------------------------------------------------------------------------
def test_session_socket_has_tcp_nodelay(mosquitto: BrokerInfo) -> None:
    async def scenario() -> None:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(_config(mosquitto), client_id=_client_id("nodelay")) as session:
                await session.wait_connected()
                client = session._client
                assert client is not None
                sock = client.socket()
                assert isinstance(sock, socket.socket)
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    asyncio.run(scenario())


# -- 7b: reading what the socket holds ------------------------------------------------------
def _publish_bytes(topic: str, payload: bytes) -> int:
    """Size on the wire of an MQTT 5 QoS 1 PUBLISH with no properties."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + len(payload)
    return 1 + (1 if remaining < 128 else 2) + remaining


async def _burst_in_socket(
    session: MqttSession, mqtt_probe: ProbeFactory, broker: BrokerInfo, topic: str, n: int
) -> list[bytes]:
    """With reading paused, have the broker send ``n`` QoS 1 messages and wait until all of
    them wait in the session's socket (``FIONREAD``); reading stays paused."""
    payloads = [b"%04d" % i + b"x" * 60 for i in range(n)]
    session.pause_reading()
    publisher = mqtt_probe(broker)
    await asyncio.to_thread(publisher.publish_many, topic, payloads)
    client = session._client
    assert client is not None
    sock = client.socket()
    assert isinstance(sock, socket.socket)
    want = sum(_publish_bytes(topic, p) for p in payloads)
    buf = bytearray(4)

    def buffered() -> int:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        return int.from_bytes(buf, "little")

    await eventually(lambda: buffered() >= want, f"{want} bytes in the socket")
    return payloads


def test_one_readable_event_reads_every_buffered_message(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    """paho reads one packet per ``loop_read`` when the client has nothing in flight outwards;
    the session must read on while the socket holds more (one event-loop wakeup, not one per
    message: the node's micro-batches depend on it)."""
    topic = _topic("burst")
    n = 50
    assert n <= READS_PER_WAKEUP  # so the whole burst fits in one wakeup

    async def scenario() -> None:
        inbox = Inbox()
        connects = Connects()
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(
                _config(mosquitto, protocol="5"),
                client_id=_client_id("burst"),
                on_message=inbox,
                on_connect=connects,
            ) as session:
                inbox.ack_with = session
                session.subscribe(topic)
                await connects.wait_count(1)
                payloads = await _burst_in_socket(session, mqtt_probe, mosquitto, topic, n)
                wakeups = session.stats.read_wakeups
                session.resume_reading()
                await inbox.wait_for(topic, payloads[-1])
                assert inbox.payloads(topic) == payloads
                assert session.stats.read_wakeups - wakeups == 1

    asyncio.run(scenario())


def test_reading_a_burst_stops_at_pause_and_at_the_wakeup_cap(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler that pauses reading (the node's backpressure) stops the burst at once; and one
    wakeup makes at most READS_PER_WAKEUP reads, so other tasks get their turn."""
    topic = _topic("burst-stop")
    n = 40
    monkeypatch.setattr("edgewise.mqtt.socket_driver.READS_PER_WAKEUP", 8)

    async def scenario() -> None:
        got: list[Inbound] = []
        changed = asyncio.Event()
        session_box: list[MqttSession] = []

        def handler(msg: Inbound) -> None:
            got.append(msg)
            session_box[0].ack(msg)
            if len(got) == 5:
                session_box[0].pause_reading()
            changed.set()

        async def wait_count(k: int) -> None:
            while len(got) < k:
                changed.clear()
                await changed.wait()

        connects = Connects()
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(
                _config(mosquitto, protocol="5"),
                client_id=_client_id("burst-stop"),
                on_message=handler,
                on_connect=connects,
            ) as session:
                session_box.append(session)
                session.subscribe(topic)
                await connects.wait_count(1)
                payloads = await _burst_in_socket(session, mqtt_probe, mosquitto, topic, n)
                session.resume_reading()
                await wait_count(5)  # returns after that wakeup's reads are over
                assert session.reading_paused
                assert len(got) == 5  # not one more read after the handler paused
                wakeups = session.stats.read_wakeups
                session.resume_reading()
                await wait_count(n)
                assert [m.payload for m in got] == payloads
                assert session.stats.read_wakeups - wakeups == (n - 5 + 7) // 8  # 8 per wakeup

    asyncio.run(scenario())


# -- 8: Receive Maximum ----------------------------------------------------------------------
def _advertised_receive_maximum(broker: BrokerInfo) -> int | None:
    """The Receive Maximum in the broker's MQTT 5 CONNACK, read by a bare paho client."""
    got: list[Properties | None] = []
    done = threading.Event()

    def on_connect(
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        got.append(properties)
        done.set()

    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=_client_id("rxmax"), protocol=paho.MQTTv5
    )
    client.on_connect = on_connect
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        if not done.wait(10):
            raise ProbeError("no CONNACK from the broker")
    finally:
        client.disconnect()
        client.loop_stop()
    props = got[0]
    if props is None or not hasattr(props, "ReceiveMaximum"):
        return None
    return int(props.ReceiveMaximum)


@pytest.fixture
def small_window_mosquitto(start_mosquitto: BrokerFactory) -> MosquittoProcess:
    """Mosquitto whose MQTT 5 CONNACK advertises Receive Maximum 5 (``extra`` comes after the
    tuning file's ``max_inflight_messages 1000``, so it wins)."""
    return start_mosquitto("small-window", extra_config="max_inflight_messages 5")


def test_broker_receive_maximum_lowers_the_inflight_window(
    small_window_mosquitto: MosquittoProcess,
) -> None:
    broker = small_window_mosquitto.info
    advertised = _advertised_receive_maximum(broker)
    assert advertised == 5
    topic = _topic("rxmax")

    async def scenario() -> None:
        connects = Connects()
        config = _config(broker, receive_maximum=1000)
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(
                config, client_id=_client_id("rxmax"), on_connect=connects
            ) as session:
                info = await connects.wait_count(1)
                assert info.broker_receive_maximum == advertised
                assert session.broker_receive_maximum == advertised
                client = session._client
                assert client is not None
                assert client.max_inflight_messages == advertised
                # paho holds back what does not fit in the window, and sends it as PUBACKs come.
                futures = [session.publish_nowait(topic, b"%d" % i) for i in range(20)]
                assert client._inflight_messages == advertised
                await asyncio.gather(*futures)

    asyncio.run(scenario())


def test_own_smaller_window_is_kept_and_mqtt311_has_no_broker_limit(
    small_window_mosquitto: MosquittoProcess,
) -> None:
    broker = small_window_mosquitto.info

    async def scenario() -> None:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(
                _config(broker, receive_maximum=3), client_id=_client_id("own")
            ) as session:
                await session.wait_connected()
                assert session.broker_receive_maximum == 5
                assert session._client is not None
                assert session._client.max_inflight_messages == 3
            async with MqttSession(
                _config(broker, protocol="3.1.1", receive_maximum=50), client_id=_client_id("v3")
            ) as session:
                await session.wait_connected()
                assert session.broker_receive_maximum == 65535
                assert session._client is not None
                assert session._client.max_inflight_messages == 50

    asyncio.run(scenario())


# -- 9: backoff: tests/test_reconnect_schedule.py ------------------------------------------


# -- a connect that outlives connect_timeout_s -----------------------------------------------
def test_connect_finishing_after_its_timeout_leaves_no_socket_behind(
    mosquitto: BrokerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paho's blocking connect runs in a thread; when it outlives ``connect_timeout_s`` the
    session moves on, and the socket that connect opens later must be closed, not left
    registered with the event loop (where it would be readable/writable forever)."""
    real_connect = paho.Client.connect
    release = threading.Event()
    finished = threading.Event()
    stale: list[paho.Client] = []

    def slow_first_connect(self: paho.Client, *args: Any, **kwargs: Any) -> Any:
        if stale:
            return real_connect(self, *args, **kwargs)
        stale.append(self)
        try:
            release.wait(20)  # like a TCP handshake that takes longer than connect_timeout_s
            return real_connect(self, *args, **kwargs)
        finally:
            finished.set()

    monkeypatch.setattr(paho.Client, "connect", slow_first_connect)

    async def scenario() -> None:
        config = _config(mosquitto, connect_timeout_s=0.5)
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            async with MqttSession(config, client_id=_client_id("slowconn")) as session:
                await session.wait_connected()  # the second attempt
                assert session.stats.connect_failures >= 1
                release.set()
                await asyncio.to_thread(finished.wait, 20)
                [client] = stale
                assert client is not session._client
                sock = client.socket()
                assert isinstance(sock, socket.socket)
                await eventually(lambda: sock.fileno() == -1, "the stale socket to close")
                assert session.connected
                await session.publish(_topic("slowconn"), b"still-fine")

    asyncio.run(scenario())

"""`DirectClient` skips paho's per-topic callback look-up (edgewise/mqtt/client.py). These tests
fail if a paho upgrade stops routing received messages through the overridden method, and show
that messages and handler errors still go where they did, against a real Mosquitto."""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import inspect
import socket
import termios
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgewise.local_broker import BrokerInfo
from edgewise.mqtt import ConnectInfo, Inbound, MqttConfig, MqttSession, PublishProperties
from edgewise.mqtt.client import DirectClient
from tests.waiting import eventually

TIMEOUT_S = 20


@contextlib.asynccontextmanager
async def subscribed_pair(
    broker: BrokerInfo,
    topic: str,
    on_message: Callable[[Inbound], None],
    *,
    protocol: Literal["auto", "5", "3.1.1"] = "auto",
    keep_properties: bool = False,
    publisher: Callable[[MqttConfig], MqttConfig] = lambda cfg: cfg,
) -> AsyncIterator[tuple[MqttSession, MqttSession]]:
    """A session subscribed to ``topic`` at QoS 1 (its SUBACK in) and a connected publisher
    (its config made from the subscriber's by ``publisher``), on ``broker``."""
    cfg = MqttConfig(host=broker.host, port=broker.port, protocol=protocol)
    subscribed = asyncio.Event()

    async def on_connect(info: ConnectInfo) -> None:  # after the SUBACK
        subscribed.set()

    sub = MqttSession(
        cfg, client_id=f"sub-{uuid.uuid4().hex[:8]}", on_message=on_message,
        on_connect=on_connect, manual_ack=False, persistent=False,
        keep_properties=keep_properties,
    )  # fmt: skip
    sub.subscribe(topic, qos=1)
    pub_cfg = publisher(cfg)
    pub_id = f"pub-{uuid.uuid4().hex[:8]}"
    async with sub, MqttSession(pub_cfg, client_id=pub_id, persistent=False) as pub:
        await subscribed.wait()
        await pub.wait_connected()
        yield sub, pub


def collector(count: int) -> tuple[list[bytes], asyncio.Event, Callable[[Inbound], None]]:
    """A message handler that keeps the payloads, and an event set once ``count`` arrived."""
    got: list[bytes] = []
    done = asyncio.Event()

    def handler(msg: Inbound) -> None:
        got.append(msg.payload)
        if len(got) == count:
            done.set()

    return got, done, handler


def test_paho_still_routes_received_publishes_through_the_overridden_method() -> None:
    assert "_handle_on_message" in vars(paho.Client)
    source = inspect.getsource(paho.Client._handle_publish)
    assert source.count("self._handle_on_message(message)") >= 2  # QoS 0 and QoS 1


def test_per_topic_callbacks_are_refused() -> None:
    client = DirectClient(paho.CallbackAPIVersion.VERSION2, client_id="x")
    with pytest.raises(NotImplementedError, match="on_message"):
        client.message_callback_add("a/#", lambda c, u, m: None)


@pytest.mark.parametrize("qos", [0, 1])
def test_every_message_reaches_the_handler_and_a_failing_handler_is_counted(
    mosquitto: BrokerInfo, qos: int
) -> None:
    topic = f"test/direct/{uuid.uuid4().hex}"
    got: list[Inbound] = []
    done = asyncio.Event()

    def handler(msg: Inbound) -> None:
        got.append(msg)
        if msg.payload == b"boom":
            raise RuntimeError("handler bug")
        if len(got) == 3:
            done.set()

    async def scenario() -> int:
        async with asyncio.timeout(TIMEOUT_S):
            async with subscribed_pair(mosquitto, topic, handler) as (sub, pub):
                assert isinstance(sub._client, DirectClient)
                for payload in (b"one", b"boom", b"three"):
                    await pub.publish(topic, payload, qos=qos)
                await done.wait()
                return sub.stats.handler_errors

    errors = asyncio.run(scenario())
    assert [m.payload for m in got] == [b"one", b"boom", b"three"]
    assert {m.topic for m in got} == {topic}
    assert errors == 1


def test_paho_still_hands_pubacks_to_the_overridden_method() -> None:
    assert "_handle_pubackcomp" in vars(paho.Client)
    source = inspect.getsource(paho.Client._packet_handle)
    assert '_handle_pubackcomp("PUBACK")' in source
    assert "_do_on_publish" in vars(paho.Client)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_two_byte_pubacks_skip_pahos_decoding_and_complete_every_publish(
    mosquitto: BrokerInfo, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {"paho": 0}
    original = paho.Client._handle_pubackcomp

    def counted(self: paho.Client, cmd: str) -> MQTTErrorCode:
        seen["paho"] += 1
        return original(self, cmd)  # type: ignore[arg-type]

    monkeypatch.setattr(paho.Client, "_handle_pubackcomp", counted)
    topic = f"test/puback/{uuid.uuid4().hex}"

    async def scenario() -> int:
        cfg = MqttConfig(host=mosquitto.host, port=mosquitto.port, protocol=protocol)
        client_id = f"pub-{uuid.uuid4().hex[:8]}"
        async with asyncio.timeout(TIMEOUT_S):
            async with MqttSession(cfg, client_id=client_id, persistent=False) as pub:
                await pub.wait_connected()
                futures = [pub.publish_nowait(topic, b"%d" % i, qos=1) for i in range(200)]
                results = await asyncio.gather(*futures, return_exceptions=True)
                return sum(r is None for r in results)

    assert asyncio.run(scenario()) == 200  # each publish completed by its PUBACK
    assert seen["paho"] == 0


def test_paho_still_hands_publishes_to_the_overridden_method() -> None:
    assert "_handle_publish" in vars(paho.Client)
    source = inspect.getsource(paho.Client._packet_handle)
    assert "self._handle_publish()" in source
    for name in ("_send_puback", "_in_packet", "_manual_ack", "_protocol"):
        assert name in inspect.getsource(paho.Client), name
    assert callable(paho.time_func)


@pytest.mark.parametrize("keep", [True, False])
def test_mqtt5_messages_arrive_whole_by_either_reader(mosquitto: BrokerInfo, keep: bool) -> None:
    """Messages with the common properties are read by DirectClient, one with a user property
    by paho: both arrive with their topic, payload and (when kept) properties."""
    topic = f"test/v5read/{uuid.uuid4().hex}"
    got: list[Inbound] = []
    done = asyncio.Event()

    def handler(msg: Inbound) -> None:
        got.append(msg)
        if len(got) == 3:
            done.set()

    async def scenario() -> None:
        user = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        user.UserProperty = ("k", "v")
        user.CorrelationData = b"c3"
        async with asyncio.timeout(TIMEOUT_S):
            async with subscribed_pair(
                mosquitto, topic, handler, protocol="5", keep_properties=keep
            ) as (_, pub):
                await pub.publish(topic, b"plain", qos=0)
                await pub.publish(
                    topic, b"common", qos=1,
                    properties=PublishProperties(response_topic="r/1", correlation_data=b"c2"),
                )  # fmt: skip
                await pub.publish(topic, b"user", qos=1, properties=user)
                await done.wait()

    asyncio.run(scenario())
    assert [(m.topic, m.payload) for m in got] == [
        (topic, b"plain"), (topic, b"common"), (topic, b"user"),
    ]  # fmt: skip
    if not keep:
        assert [m.properties for m in got[:2]] == [None, None]
        return
    plain, common, user_msg = (m.properties for m in got)
    assert plain is not None and plain.isEmpty()
    assert common is not None
    assert (common.ResponseTopic, common.CorrelationData) == ("r/1", b"c2")
    assert user_msg is not None
    assert (user_msg.UserProperty, user_msg.CorrelationData) == ([("k", "v")], b"c3")


def test_paho_still_queues_and_scans_where_the_overrides_expect() -> None:
    assert {"_update_inflight", "_messages_reconnect_reset_out", "publish"} <= set(
        vars(paho.Client)
    )
    assert "message.state = mqtt_ms_queued" in inspect.getsource(paho.Client.publish)
    assert "m.state = mqtt_ms_queued" in inspect.getsource(
        paho.Client._messages_reconnect_reset_out
    )
    assert "self._update_inflight()" in inspect.getsource(paho.Client._do_on_publish) or (
        "self._update_inflight()" in inspect.getsource(paho.Client)
    )


@pytest.mark.parametrize("window", [5, 1000])
def test_publishes_beyond_the_in_flight_window_wait_and_all_arrive_in_order(
    mosquitto: BrokerInfo, window: int
) -> None:
    """With a window of 5, most of 300 publishes wait in paho's queue and go, oldest first, as
    PUBACKs free slots; with 1,000 none waits."""
    topic = f"test/window/{uuid.uuid4().hex}"
    got, done, handler = collector(300)

    async def scenario() -> int:
        async with asyncio.timeout(TIMEOUT_S):
            async with subscribed_pair(
                mosquitto, topic, handler, protocol="5",
                publisher=lambda cfg: cfg.model_copy(update={"receive_maximum": window}),
            ) as (_, pub):  # fmt: skip
                futures = [pub.publish_nowait(topic, b"%d" % i, qos=1) for i in range(300)]
                client = pub._client
                assert isinstance(client, DirectClient)
                waited = len(client._queued or [])
                assert await asyncio.gather(*futures) == [None] * 300
                await done.wait()
                assert not client._queued
                return waited

    waited = asyncio.run(scenario())
    assert got == [b"%d" % i for i in range(300)]
    assert waited == (300 - window if window < 300 else 0)


def test_queued_publishes_are_tracked_through_a_reconnect_reset() -> None:
    client = DirectClient(paho.CallbackAPIVersion.VERSION2, client_id="x")
    client.max_inflight_messages_set(2)
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        client._sock = ours  # sends succeed: two go in flight, the rest wait for a slot
        infos = [client.publish("t", b"%d" % i, qos=1) for i in range(6)]

        def waiting() -> list[int]:
            return [
                m for m, msg in client._out_messages.items() if msg.state == paho.mqtt_ms_queued
            ]

        assert waiting() == [i.mid for i in infos[2:]]
        assert list(client._queued or []) == waiting()
        client._messages_reconnect_reset_out()
        assert list(client._queued or []) == waiting()
    finally:
        client._sock = None
        ours.close()
        theirs.close()


def test_what_the_socket_cannot_take_at_once_waits_for_it_to_be_writable(
    mosquitto: BrokerInfo,
) -> None:
    """Packets are written at the next turn of the loop without asking the selector (small
    publishes never register a writer); 64 MiB published in one go do not fit the socket, so
    the session waits for it to be writable (add_writer), and every message arrives whole, in
    order."""
    topic = f"test/full/{uuid.uuid4().hex}"
    small = [b"s%d" % i for i in range(10)]
    payloads = small + [bytes([i]) * (1 << 20) for i in range(64)]
    got, done, handler = collector(len(payloads))

    async def scenario() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        waits = 0
        original = loop.add_writer

        def add_writer(fd: Any, callback: Any, *args: Any) -> None:
            nonlocal waits
            waits += 1
            original(fd, callback, *args)

        loop.add_writer = add_writer  # type: ignore[method-assign]
        async with asyncio.timeout(60):
            async with subscribed_pair(mosquitto, topic, handler) as (_, pub):
                waits = 0
                for p in small:
                    await pub.publish(topic, p, qos=1)
                after_small = waits
                big = payloads[len(small) :]
                futures = [pub.publish_nowait(topic, p, qos=1) for p in big]
                assert await asyncio.gather(*futures) == [None] * len(big)
                await done.wait()
        return after_small, waits

    after_small, waits = asyncio.run(scenario())
    assert after_small == 0
    assert waits > 0
    assert got == payloads


# ---------------------------------------------------------------------- buffered socket I/O
def test_paho_still_reads_and_writes_through_the_overridden_methods() -> None:
    assert {"_sock_recv", "_sock_send", "_sock_close", "_packet_write", "_packet_read"} <= set(
        vars(paho.Client)
    )
    assert inspect.getsource(paho.Client._packet_read).count("self._sock_recv(") >= 3
    assert "self._sock_send(" in inspect.getsource(paho.Client._packet_write)
    assert "self._packet_write()" in inspect.getsource(paho.Client.loop_write)
    assert "self._sock_close()" in inspect.getsource(paho.Client._reset_sockets)


def test_read_ahead_is_served_in_order_and_dropped_with_its_socket() -> None:
    client = DirectClient(paho.CallbackAPIVersion.VERSION2, client_id="x")
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        client._sock = ours
        theirs.sendall(b"abcdefgh")
        assert client._sock_recv(1) == b"a"  # one recv took all eight bytes
        assert client.buffered() == 7
        assert client._sock_recv(3) == b"bcd"
        assert client._sock_recv(10) == b"efgh"  # what is left, no more
        assert client.buffered() == 0
        with pytest.raises(BlockingIOError):
            client._sock_recv(1)
        theirs.sendall(b"xyz")
        assert client._sock_recv(1) == b"x" and client.buffered() == 2
        client._sock_close()  # a reconnect: the old socket's bytes must not reach the new one
        assert client.buffered() == 0
    finally:
        theirs.close()


def test_many_packets_are_read_with_few_recv_calls_and_arrive_in_order(
    mosquitto: BrokerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 messages queued for a subscriber while it is away arrive with far fewer ``recv``
    calls than packets (paho alone makes three or more per packet)."""
    topic = f"test/readahead/{uuid.uuid4().hex}"
    got, done, handler = collector(500)
    recvs = 0
    original = paho.Client._sock_recv

    def counted(self: paho.Client, bufsize: int) -> bytes:
        nonlocal recvs
        recvs += 1
        return original(self, bufsize)

    async def scenario() -> None:
        async with asyncio.timeout(TIMEOUT_S):
            async with subscribed_pair(mosquitto, topic, handler) as (_, pub):
                monkeypatch.setattr(paho.Client, "_sock_recv", counted)
                futures = [pub.publish_nowait(topic, b"%d" % i, qos=1) for i in range(500)]
                await asyncio.gather(*futures)
                await done.wait()

    asyncio.run(scenario())
    assert got == [b"%d" % i for i in range(500)]
    assert recvs < 500  # both sessions' reads: PUBACKs to the publisher, PUBLISHes to the other


def test_messages_read_ahead_while_reading_is_paused_arrive_once_it_resumes(
    mosquitto: BrokerInfo,
) -> None:
    """The subscriber pauses reading at its first message while later ones sit in its read-ahead
    buffer (the socket itself may hold nothing more): resuming delivers them all, although no
    new byte arrives to wake the loop."""
    topic = f"test/paused/{uuid.uuid4().hex}"
    got: list[bytes] = []
    done = asyncio.Event()
    buffered_at_pause: list[int] = []
    sub_box: list[MqttSession] = []

    def handler(msg: Inbound) -> None:
        got.append(msg.payload)
        if len(got) == 1:
            sub = sub_box[0]
            client = sub._client
            assert isinstance(client, DirectClient)
            buffered_at_pause.append(client.buffered())
            sub.pause_reading()
            asyncio.get_running_loop().call_later(0.2, sub.resume_reading)
        if len(got) == 200:
            done.set()

    payloads = [b"%d" % i for i in range(200)]
    # MQTT 5, QoS 1, no properties: header byte, 1-byte length, topic, id, property length.
    expected = sum(1 + 1 + 2 + len(topic) + 2 + 1 + len(p) for p in payloads)

    def pending(sock: socket.socket) -> int:
        buf = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        return buf[0]

    async def scenario() -> None:
        async with asyncio.timeout(TIMEOUT_S):
            async with subscribed_pair(mosquitto, topic, handler, protocol="5") as (sub, pub):
                sub_box.append(sub)
                sub.pause_reading()  # all 200 wait in the socket, then come in one read
                futures = [pub.publish_nowait(topic, p, qos=1) for p in payloads]
                await asyncio.gather(*futures)
                client = sub._client
                assert isinstance(client, DirectClient)
                sock = client.socket()
                assert isinstance(sock, socket.socket)
                await eventually(lambda: pending(sock) >= expected, "pending(sock) >= expected")
                sub.resume_reading()
                await done.wait()

    asyncio.run(scenario())
    assert buffered_at_pause and buffered_at_pause[0] > 0
    assert got == payloads


def test_packets_queued_together_go_in_few_sends_and_arrive_whole_in_order(
    mosquitto: BrokerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 publishes queued in one turn (20 KB each and small ones, interleaved: 6 MB, more than
    the socket takes at once, so joined sends are cut short and resumed) go in far fewer
    ``send`` calls than packets, and every message arrives whole, in order."""
    topic = f"test/join/{uuid.uuid4().hex}"
    payloads = [bytes([i % 251]) * 20_000 if i % 2 else b"s%d" % i for i in range(600)]
    got, done, handler = collector(len(payloads))
    sends = 0
    original = paho.Client._sock_send

    def counted(self: paho.Client, buf: bytes | bytearray) -> int:
        nonlocal sends
        sends += 1
        return original(self, buf)

    async def scenario() -> None:
        async with asyncio.timeout(60):
            async with subscribed_pair(mosquitto, topic, handler) as (_, pub):
                monkeypatch.setattr(paho.Client, "_sock_send", counted)
                futures = [pub.publish_nowait(topic, p, qos=1) for p in payloads]
                assert await asyncio.gather(*futures) == [None] * len(payloads)
                await done.wait()

    asyncio.run(scenario())
    assert got == payloads
    assert sends < len(payloads) // 2  # the subscriber's PUBACKs counted too


def _publish_v311(topic: bytes, payload: bytes) -> bytes:
    """A QoS 0 MQTT 3.1.1 PUBLISH, with its remaining length as a variable byte integer."""
    body = len(topic).to_bytes(2, "big") + topic + payload
    length, header = len(body), bytearray([0x30])
    while True:
        byte, length = length % 128, length // 128
        header.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(header) + body


@pytest.mark.parametrize("reader", [DirectClient, paho.Client])
def test_whole_and_split_packets_are_read_alike_with_and_without_read_ahead(
    reader: type[paho.Client],
) -> None:
    """The same bytes through `DirectClient` (paho's reads served from its read-ahead buffer)
    and through plain paho: payloads of 0 B to 20 KB (remaining lengths of 1 to 3 bytes), a
    packet cut across two reads, then a remaining length of five bytes (refused)."""
    payloads = [b"", b"hello", b"x" * 200, bytes(range(256)) * 80]
    got: list[bytes] = []
    client = reader(paho.CallbackAPIVersion.VERSION2, client_id="x")
    client.on_message = lambda c, u, m: got.append(bytes(m.payload))
    ours, theirs = socket.socketpair()

    def read_all() -> MQTTErrorCode:
        while True:
            rc = client._packet_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc

    try:
        ours.setblocking(False)
        client._sock = ours
        theirs.sendall(b"".join(_publish_v311(b"t/1", p) for p in payloads))
        assert read_all() == MQTTErrorCode.MQTT_ERR_AGAIN
        assert got == payloads
        cut = _publish_v311(b"t/2", b"y" * 1000)
        theirs.sendall(_publish_v311(b"t/2", b"first") + cut[:500])
        assert read_all() == MQTTErrorCode.MQTT_ERR_AGAIN
        assert got[-1] == b"first"
        theirs.sendall(cut[500:])
        assert read_all() == MQTTErrorCode.MQTT_ERR_AGAIN
        assert got[-1] == b"y" * 1000 and len(got) == len(payloads) + 2
        theirs.sendall(b"\x30\xff\xff\xff\xff\x01")
        assert read_all() == MQTTErrorCode.MQTT_ERR_PROTOCOL
    finally:
        client._sock = None
        ours.close()
        theirs.close()

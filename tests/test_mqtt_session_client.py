"""`DirectClient` skips paho's per-topic callback look-up (mqtt_session/client.py). These tests
fail if a paho upgrade stops routing received messages through the overridden method, and show
that messages and handler errors still go where they did, against a real Mosquitto."""

from __future__ import annotations

import asyncio
import inspect
import uuid

import paho.mqtt.client as paho
import pytest

from local_broker import BrokerInfo
from mqtt_session import ConnectInfo, Inbound, MqttConfig, MqttSession
from mqtt_session.client import DirectClient

TIMEOUT_S = 20


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
        cfg = MqttConfig(host=mosquitto.host, port=mosquitto.port)
        subscribed = asyncio.Event()

        async def on_connect(info: ConnectInfo) -> None:  # after the SUBACK
            subscribed.set()

        sub = MqttSession(
            cfg, client_id=f"sub-{uuid.uuid4().hex[:8]}", on_message=handler,
            on_connect=on_connect, manual_ack=False, persistent=False,
        )  # fmt: skip
        sub.subscribe(topic, qos=1)
        async with asyncio.timeout(TIMEOUT_S):
            async with (
                sub,
                MqttSession(cfg, client_id=f"pub-{uuid.uuid4().hex[:8]}", persistent=False) as pub,
            ):
                await subscribed.wait()
                assert isinstance(sub._client, DirectClient)
                await pub.wait_connected()
                for payload in (b"one", b"boom", b"three"):
                    await pub.publish(topic, payload, qos=qos)
                await done.wait()
                return sub.stats.handler_errors

    errors = asyncio.run(scenario())
    assert [m.payload for m in got] == [b"one", b"boom", b"three"]
    assert {m.topic for m in got} == {topic}
    assert errors == 1

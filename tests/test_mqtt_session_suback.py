"""``MqttSession.subscribe`` returns the SUBACK's answer as a future, against real brokers
(Mosquitto; amqtt for a refused SUBSCRIBE, as Mosquitto grants every filter it can parse).

The future resolves with the QoS granted, raises :class:`SubscribeRefused` when the broker
refuses, and :class:`Disconnected` when the connection the SUBSCRIBE went out on drops first.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from edgewise.local_broker import BrokerInfo, MosquittoProcess, free_port, quiet_amqtt_logging
from edgewise.mqtt import Disconnected, Inbound, MqttConfig, MqttSession, SubscribeRefused

TIMEOUT_S = 30.0


def _config(broker: BrokerInfo) -> MqttConfig:
    return MqttConfig(
        host=broker.host, port=broker.port, reconnect_first_s=0.1, reconnect_cap_s=0.5
    )


def test_a_subscription_made_before_connecting_resolves_at_its_suback(
    mosquitto: BrokerInfo,
) -> None:
    topic = f"test/suback/{uuid.uuid4().hex}"
    got: list[Inbound] = []
    arrived = asyncio.Event()

    def on_message(msg: Inbound) -> None:
        got.append(msg)
        arrived.set()

    async def scenario() -> tuple[int, int]:
        async with asyncio.timeout(TIMEOUT_S):
            async with (
                MqttSession(
                    _config(mosquitto),
                    client_id=f"suback-{uuid.uuid4().hex[:8]}",
                    on_message=on_message,
                    manual_ack=False,
                    persistent=False,
                ) as sub,
                MqttSession(_config(mosquitto), client_id=f"pub-{uuid.uuid4().hex[:8]}") as pub,
            ):
                granted = await sub.subscribe(topic, qos=1)  # not connected yet: the first SUBACK
                await pub.wait_connected()
                await pub.publish(topic, b"after the suback", qos=1)  # no sleep: it is subscribed
                await arrived.wait()
                again = await sub.subscribe(f"{topic}/qos0", qos=0)  # connected: sent at once
                return granted, again

    assert asyncio.run(scenario()) == (1, 0)
    assert [m.payload for m in got] == [b"after the suback"]


def test_a_kept_session_answers_with_the_qos_asked_for(mosquitto: BrokerInfo) -> None:
    """The broker kept the session (Session Present = 1): no SUBSCRIBE goes out (ADR 0002),
    and the future does not wait for a SUBACK that never comes."""
    client_id = f"kept-{uuid.uuid4().hex[:8]}"
    topic = f"test/suback/kept/{uuid.uuid4().hex}"

    async def run() -> tuple[int, list[str]]:
        async with asyncio.timeout(TIMEOUT_S):
            async with MqttSession(_config(mosquitto), client_id=client_id) as s:
                answer = await s.subscribe(topic, qos=1)
                return answer, sorted(s._subs.unconfirmed)

    assert asyncio.run(run()) == (1, [])  # a new session: subscribed, confirmed by its SUBACK
    assert asyncio.run(run()) == (1, [])  # the kept session: nothing sent, nothing awaited


def test_a_connection_lost_before_the_suback_fails_the_future(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    broker = fresh_mosquitto.info
    topic = f"test/suback/lost/{uuid.uuid4().hex}"

    async def scenario() -> BaseException:
        async with asyncio.timeout(TIMEOUT_S):
            session = MqttSession(_config(broker), client_id=f"lost-{uuid.uuid4().hex[:8]}")
            send_subscribe = session._send_subscribe

            def send_then_crash(subs: list[Any]) -> Any:
                fut = send_subscribe(subs)
                fresh_mosquitto.kill()  # before the SUBSCRIBE is even written
                return fut

            async with session:
                await session.wait_connected()
                session._send_subscribe = send_then_crash  # type: ignore[method-assign]
                with pytest.raises(Disconnected) as err:
                    await session.subscribe(topic)
                return err.value

    assert "SUBACK" in str(asyncio.run(scenario()))


def test_a_session_closed_before_the_subscribe_went_out_fails_the_future() -> None:
    async def scenario() -> asyncio.Future[int]:
        config = MqttConfig(port=free_port(), reconnect_first_s=2.0)  # nobody listens there
        async with MqttSession(config, client_id="never-up") as s:
            fut = s.subscribe("test/suback/never")
        return fut

    fut = asyncio.run(scenario())
    assert isinstance(fut.exception(), Disconnected)


@pytest.mark.filterwarnings("ignore:The 'acl' option is deprecated:DeprecationWarning")
def test_a_refused_subscription_raises_and_stays_in_the_book() -> None:
    async def scenario() -> tuple[SubscribeRefused, int, list[str]]:
        from amqtt.broker import Broker
        from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType

        quiet_amqtt_logging()
        port = free_port()
        broker = Broker(
            BrokerConfig(
                listeners={
                    "default": ListenerConfig(type=ListenerType.TCP, bind=f"127.0.0.1:{port}")
                },
                plugins={
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
                    "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {
                        "acl": {"anonymous": ["allowed/#"]}
                    },
                },
            )
        )
        await broker.start()
        try:
            config = MqttConfig(port=port, protocol="3.1.1")  # amqtt: MQTT 3.1.1 only
            async with asyncio.timeout(TIMEOUT_S):
                async with MqttSession(config, client_id="refused", manual_ack=False) as s:
                    granted = await s.subscribe("allowed/x")
                    with pytest.raises(SubscribeRefused) as err:
                        await s.subscribe("edge/#")
                    kept = sorted(s._subs.all)
        finally:
            await broker.shutdown()
        return err.value, granted, kept

    refused, granted, kept = asyncio.run(scenario())
    assert granted == 1
    assert (refused.topic_filter, refused.reason_code) == ("edge/#", 0x80)
    assert kept == ["allowed/x", "edge/#"]  # subscribe keeps it, as it always did

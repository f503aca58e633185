"""What a command needs from edgewise.mqtt: the reason of a failed first connect at once
(``wait_connected_or_failed``) instead of retries, and the broker's answer to a subscription
(``subscribe_confirmed``), against real brokers (Mosquitto; amqtt for a refused SUBSCRIBE, as
Mosquitto's ACL file never refuses one)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from edgewise.local_broker import BrokerInfo, free_port, quiet_amqtt_logging
from edgewise.mqtt import ConnectFailed, MqttConfig, MqttSession, SubscribeRefused


def test_a_failed_first_connect_raises_its_reason_instead_of_retrying() -> None:
    async def scenario() -> tuple[ConnectFailed, int]:
        config = MqttConfig(port=free_port(), reconnect_first_s=2.0, reconnect_cap_s=60.0)
        async with MqttSession(config, client_id="first-connect") as s:
            with pytest.raises(ConnectFailed) as err:
                await s.wait_connected_or_failed(30)
            return err.value, s.stats.connect_failures

    error, failures = asyncio.run(scenario())
    assert failures == 1  # the first attempt, not a retry later
    assert "Connection refused" in str(error)
    assert isinstance(error.__cause__, ConnectFailed)
    assert isinstance(error.__cause__.__cause__, ConnectionRefusedError)


def test_an_unanswered_connect_names_its_timeout() -> None:
    """A listener that accepts and says nothing: both protocol attempts time out, and the
    reason says so (it used to be empty)."""

    async def scenario() -> str:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            config = MqttConfig(port=port, connect_timeout_s=0.3)
            async with MqttSession(config, client_id="silent") as s:
                with pytest.raises(ConnectFailed) as err:
                    await s.wait_connected_or_failed(30)
        return str(err.value)

    assert "CONNACK" in asyncio.run(scenario())


def test_wait_connected_or_failed_returns_once_connected_and_subscriptions_are_confirmed(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> int:
        config = MqttConfig(host=mosquitto.host, port=mosquitto.port)
        async with MqttSession(config, client_id=f"confirm-{uuid.uuid4().hex[:6]}") as s:
            await s.wait_connected_or_failed(30)
            return await s.subscribe_confirmed(f"confirm/{uuid.uuid4().hex}/#", qos=1)

    assert asyncio.run(scenario()) == 1


@pytest.mark.filterwarnings("ignore:The 'acl' option is deprecated:DeprecationWarning")
def test_a_refused_subscription_raises_with_the_brokers_reason_and_is_not_kept() -> None:
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
            async with MqttSession(config, client_id="refused", manual_ack=False) as s:
                await s.wait_connected_or_failed(30)
                granted = await s.subscribe_confirmed("allowed/x")
                with pytest.raises(SubscribeRefused) as err:
                    await s.subscribe_confirmed("edge/#")
                kept = list(s._subs.all)
        finally:
            await broker.shutdown()
        return err.value, granted, kept

    refused, granted, kept = asyncio.run(scenario())
    assert granted == 1
    assert (refused.topic_filter, refused.reason_code) == ("edge/#", 0x80)
    assert kept == ["allowed/x"]  # not sent again on the next connection

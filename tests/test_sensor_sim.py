"""`edgewise sensor simulate` (edgewise/cli/sensor.py) publishes at least once: frames whose
connection dropped before the broker acknowledged them are published again once connected."""

from __future__ import annotations

import asyncio
import uuid

from edgewise.local_broker import BrokerInfo
from edgewise.local_broker.tcpproxy import TcpProxy
from edgewise.mqtt import Inbound, MqttConfig
from schemas import decode_frame
from tests.test_mqtt_session_client import subscribed_pair


def test_frames_lost_with_a_dropped_connection_are_published_again(mosquitto: BrokerInfo) -> None:
    device = f"sim-{uuid.uuid4().hex[:6]}"
    topic = f"sensors/{device}/digits"
    seen: set[int] = set()
    total = 60
    all_seen = asyncio.Event()

    def on_frame(msg: Inbound) -> None:
        seen.add(decode_frame(msg.payload).seq)
        if len(seen) == total:
            all_seen.set()

    async def scenario() -> tuple[int, int, int]:
        from edgewise.cli.sensor import simulate

        with TcpProxy(mosquitto.host, mosquitto.port) as proxy:
            loop = asyncio.get_running_loop()

            def on_sent(seq: int, label: int) -> None:
                if seq == 20:  # frames from here on go nowhere, then the link is cut
                    proxy.pause()
                if seq == 30:
                    loop.call_soon(cut_and_restore)

            def cut_and_restore() -> None:
                proxy.cut()
                proxy.restore()

            async with subscribed_pair(mosquitto, topic, on_frame):
                stats = await simulate(
                    MqttConfig(host=proxy.host, port=proxy.port, reconnect_first_s=0.1),
                    device=device, rate_hz=200.0, count=total, on_sent=on_sent,
                )  # fmt: skip
                async with asyncio.timeout(20):
                    await all_seen.wait()
        return stats.acked, stats.failed, stats.resent

    acked, failed, resent = asyncio.run(scenario())
    assert (acked, failed) == (total, 0)
    assert resent > 0
    assert seen == set(range(total))

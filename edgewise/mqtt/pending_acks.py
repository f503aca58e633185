"""Acknowledgements awaited on the current connection, as futures that fail if it drops first.

A publish resolves at its PUBACK (QoS 1) or once written (QoS 0); a SUBSCRIBE at its SUBACK.
Each connection uses a fresh paho client, so nothing unacknowledged hides in a client's memory
across reconnects: when the connection drops, every publish awaited fails with
:class:`Disconnected` (its owner sends it again) and every SUBACK awaited is cancelled (the
subscription is sent again on the next connection).
"""

from __future__ import annotations

import asyncio
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgewise.mqtt.errors import Disconnected, MqttError, PublishFailed, PublishRejected
from edgewise.mqtt.limits import packet_size


class PendingAcks:
    """The publishes and SUBSCRIBEs of one connection still waiting for the broker's answer."""

    def __init__(self) -> None:
        self.publishes: dict[int, asyncio.Future[None]] = {}
        self.subacks: dict[int, asyncio.Future[list[int]]] = {}

    def publish(
        self,
        loop: asyncio.AbstractEventLoop,
        client: paho.Client,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        properties: Properties | None,
        v5: bool,
        broker_max_packet_bytes: int | None,
    ) -> asyncio.Future[None]:
        """Hand a publish to ``client``; the future resolves at its PUBACK (QoS 1) or once
        written (QoS 0), or fails (refused here, or the connection drops first)."""
        fut: asyncio.Future[None] = loop.create_future()
        limit = broker_max_packet_bytes
        if limit is not None and (
            properties is not None or len(payload) + 4 * len(topic) + 16 > limit
        ):
            # A packet over the broker's limit would make it drop the connection (Mosquitto:
            # DISCONNECT 0x95), and the same publish, sent again, the next one: refuse it here.
            packed = b"\x00" if properties is None else bytes(properties.pack())  # type: ignore[no-untyped-call]
            size = packet_size(topic, payload, qos, packed if v5 else None)
            if size > limit:
                fut.set_exception(
                    PublishFailed(
                        f"publish to {topic[:128]!r} refused: a {size}-byte packet, over the"
                        f" broker's maximum packet size ({limit} bytes)"
                    )
                )
                return fut
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except ValueError as exc:
            fut.set_exception(PublishFailed(f"publish to {topic!r} refused: {exc}"))
            return fut
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_QUEUE_SIZE):
            fut.set_exception(Disconnected(f"publish not sent: {paho.error_string(info.rc)}"))
            return fut
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            fut.set_exception(PublishFailed("client queue full", transient=True))
            return fut
        self.publishes[info.mid] = fut
        return fut

    def expect_suback(self, loop: asyncio.AbstractEventLoop, mid: int) -> asyncio.Future[list[int]]:
        """The future of the SUBACK of SUBSCRIBE ``mid``: its reason codes, one per filter."""
        fut: asyncio.Future[list[int]] = loop.create_future()
        self.subacks[mid] = fut
        return fut

    def on_puback(self, mid: int, reason_code: ReasonCode) -> None:
        fut = self.publishes.pop(mid, None)
        if fut is None or fut.done():
            return
        if reason_code.is_failure:
            fut.set_exception(
                PublishRejected(
                    f"broker rejected publish: {reason_code}", reason_code=int(reason_code.value)
                )
            )
        else:
            fut.set_result(None)

    def on_suback(self, mid: int, reason_codes: list[ReasonCode]) -> None:
        fut = self.subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([int(rc.value) for rc in reason_codes])

    def fail_all(self, exc: MqttError) -> None:
        """The connection is gone: every publish awaited fails, every SUBACK is cancelled."""
        pending, self.publishes = self.publishes, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: a caller that gave up must not log noise
        subacks, self.subacks = self.subacks, {}
        for sfut in subacks.values():
            if not sfut.done():
                sfut.cancel()


async def unless_lost(
    fut: asyncio.Future[Any], lost: asyncio.Event, timeout_s: float | None = None
) -> bool:
    """Wait for ``fut`` unless ``lost`` is set first; True if ``fut`` finished."""
    waiter: asyncio.Task[Any] = asyncio.ensure_future(lost.wait())
    try:
        done, _ = await asyncio.wait(
            [fut, waiter], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        waiter.cancel()
    return fut in done

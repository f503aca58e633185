"""A received MQTT message, as handed to the application."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho


@dataclass(slots=True, frozen=True)
class Inbound:
    """One received PUBLISH.

    ``connection`` is the number of the connection it arrived on; acknowledging a message from a
    connection that has since dropped does nothing (the broker redelivers it on the new one).
    ``dup`` is the DUP flag: the broker may have delivered this message before (a redelivery
    after a reconnect), so an application that keeps state per message should look it up.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    connection: int
    received_at: float
    properties: Any = None
    dup: bool = False


def inbound_from(msg: paho.MQTTMessage, connection: int, *, keep_properties: bool) -> Inbound:
    """The :class:`Inbound` of a PUBLISH paho read on connection number ``connection``."""
    try:
        topic = msg.topic
    except UnicodeDecodeError:  # brokers should refuse these; never trust it
        topic = bytes(getattr(msg, "_topic", b"")).decode("utf-8", "replace")
    return Inbound(
        topic=topic,
        payload=bytes(msg.payload),
        qos=msg.qos,
        retain=bool(msg.retain),
        mid=msg.mid,
        connection=connection,
        received_at=time.monotonic(),
        properties=getattr(msg, "properties", None) if keep_properties else None,
        dup=bool(msg.dup),
    )

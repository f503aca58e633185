"""A received MQTT message, as handed to the application."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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

"""A received MQTT message, as handed to the application."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class Inbound:
    """One received PUBLISH.

    ``connection`` is the number of the connection it arrived on; acknowledging a message from a
    connection that has since dropped does nothing (the broker redelivers it on the new one).
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    connection: int
    received_at: float
    properties: Any = None

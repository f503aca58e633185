"""Packet sizes: what a PUBLISH costs on the wire, and the Maximum Packet Size to ask for."""

from __future__ import annotations

MAX_PACKET_LIMIT = 268_435_460
"""The largest MQTT packet there can be: a 268,435,455-byte remaining length and its header."""

PACKET_OVERHEAD_BYTES = 65_536
"""Room for everything in a PUBLISH but its payload: the topic (at most 65,535 bytes), the
fixed header, the packet id and the common properties (not hostile user properties)."""


def max_packet_for(payload_bytes: int) -> int:
    """The Maximum Packet Size a connection that takes payloads of up to ``payload_bytes``
    tells the broker: a payload over the cap by less than the overhead still arrives (and is
    refused and counted by the application); a packet larger than this, the broker drops."""
    return min(payload_bytes + PACKET_OVERHEAD_BYTES, MAX_PACKET_LIMIT)


def packet_size(topic: str, payload: bytes, qos: int, properties: bytes | None) -> int:
    """Bytes of the PUBLISH packet for ``topic`` and ``payload``; ``properties``: the packed
    MQTT 5 properties (their length included), None for MQTT 3.1.1."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + len(payload)
    if properties is not None:
        remaining += len(properties)
    header = 2 if remaining < 128 else 3 if remaining < 16_384 else 4 if remaining < 2**21 else 5
    return header + remaining

"""What the bridge publishes about itself: its status (the node's :class:`schemas.Status`, with
the bridge id as ``node``) and its telemetry (:class:`BridgeTelemetry`, MessagePack)."""

from __future__ import annotations

from typing import Final

import msgspec

from schemas import DEFAULT_LIMITS, Limits
from schemas.wire import decode_msgpack


class DirectionTelemetry(msgspec.Struct, frozen=True, kw_only=True):
    """Counters of one direction since the bridge started, and its queue now."""

    received: int
    """PUBLISH packets taken from the source broker."""
    queued: int
    """Records appended to the durable queue."""
    delivered: int
    """Records the far broker acknowledged (then deleted from the queue)."""
    published: int
    refused: int
    echoes_dropped: int
    oversize_dropped: int
    unmatched: int
    evicted: int
    """Records evicted to stay within the byte bound, since the queue file was created."""
    queue_rows: int
    queue_bytes: int
    queue_file_bytes: int
    queue_max_bytes: int
    in_flight: int
    source_connected: bool
    target_connected: bool
    failed: int = 0
    """Messages dropped (and acknowledged) because a stage failed unexpectedly (a bug, a
    fault): one bad message never holds back the others."""


class AckTelemetry(msgspec.Struct, frozen=True, kw_only=True):
    """End-to-end mode: confirmations of queued results to their nodes, since start."""

    confirmed: int
    """Results messages named in a confirmation handed to the site broker."""
    withheld: int
    """Queued by an append that evicted: not confirmed (their nodes send them again)."""
    undecodable: int
    """On a confirmed topic but no valid results message: forwarded, not confirmed."""
    published: int
    failed: int


class BridgeTelemetry(msgspec.Struct, frozen=True, kw_only=True):
    bridge: str
    site: str
    ts: float
    seq: int
    up: DirectionTelemetry
    down: DirectionTelemetry
    reasons: list[str] = []
    acks: AckTelemetry | None = None
    """End-to-end mode's confirmations (``[acks] enabled``); None when off."""
    v: int = 1


_DECODER: Final = msgspec.msgpack.Decoder(BridgeTelemetry)


def encode_telemetry(t: BridgeTelemetry) -> bytes:
    return msgspec.msgpack.encode(t)


def decode_telemetry(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> BridgeTelemetry:
    """Decode and validate; raises only :class:`schemas.ContractError`."""
    return decode_msgpack(
        payload, _DECODER.decode, what="bridge telemetry", limits=limits, budget=200
    )

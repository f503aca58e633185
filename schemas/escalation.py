"""Escalations (edge node -> cloud worker) and their replies (cloud worker -> edge node).

An escalation carries everything a worker needs, also on an MQTT 3.1.1 broker: the input
tensor, the edge model's verdict with a summary of its probabilities, where to reply
(``reply_to`` and ``corr``, which an MQTT 5 publish also carries as response topic and
correlation data) and until when an answer is useful (``deadline``, seconds since the epoch,
which an MQTT 5 publish also carries as message expiry). A *hard-example upload* (an
escalation decided at the edge while the uplink was down, sent later for retraining) has no
``reply_to``, ``corr`` or ``deadline``: nobody waits for it.

A reply names the escalation it answers (``id``), echoes ``corr`` and the ``node`` that asked,
and gives the cloud's label and confidence, the worker that answered and its model.

Both are MessagePack only (no JSON: the producers are our own services). Decoding follows
:mod:`schemas.wire`: size cap, structural pre-scan, version, typed decode, then the checks
that depend on :class:`~schemas.limits.Limits` (name lengths, the tensor).
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
import numpy as np
from msgspec import Meta

from .errors import ContractError
from .fields import Fraction, Int64, Level, Name, Seconds, Seq, Text, check_names
from .limits import DEFAULT_LIMITS, Limits
from .tensor import tensor_from_wire, wire_parts
from .topics import validate_topic
from .wire import decode_msgpack

TOP_MAX: Final = 16
"""At most this many (label, probability) pairs summarise the edge model's output."""

CORR_MAX_BYTES: Final = 64
"""Longest correlation id accepted (also as MQTT 5 correlation data)."""

Corr = Annotated[str, Meta(min_length=1, max_length=CORR_MAX_BYTES)]
Probability = Fraction
NonNegative = Annotated[float, Meta(ge=0.0, le=1e6)]


class EdgeVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """What the edge model said, and how unsure it was."""

    label: Int64
    confidence: Fraction
    """Largest softmax probability."""
    margin: Fraction
    """Top-1 minus top-2 probability."""
    entropy: NonNegative
    """Shannon entropy of the probabilities, in nats."""
    top_labels: Annotated[list[Int64], Meta(max_length=TOP_MAX)] = []
    top_probs: Annotated[list[Probability], Meta(max_length=TOP_MAX)] = []


class Escalation(msgspec.Struct, frozen=True, kw_only=True):
    id: Name
    """Unique, time-ordered; workers are idempotent by it."""
    node: Level
    model: Level
    release: Seq
    device: Level
    sensor: Level
    frame_seq: Seq
    ts: Seconds
    """When the node sent it (seconds since the epoch)."""
    dtype: str
    shape: Annotated[list[int], Meta(max_length=8)]
    data: bytes
    edge: EdgeVerdict
    reply_to: Text | None = None
    """Topic to publish the reply to (``edge/{node}/reply``); None for a hard-example upload."""
    corr: Corr | None = None
    """Correlation id to echo in the reply; None for a hard-example upload."""
    deadline: Seconds | None = None
    """No answer is useful after this time (seconds since the epoch); None: never expires."""
    offline: bool = False
    """True for a case the edge decided alone because the uplink was down (``edge_offline``)."""
    v: int = 1

    @property
    def wants_reply(self) -> bool:
        return self.reply_to is not None and self.corr is not None

    def tensor(self, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
        """The input as a read-only array (validated; raises ``ContractError``)."""
        return tensor_from_wire(self.dtype, self.shape, self.data, limits)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    id: Name
    """The escalation this answers."""
    corr: Corr
    node: Level
    """The node that asked (a node refuses replies naming another node)."""
    label: Int64
    confidence: Fraction
    worker: Name
    model: Name
    """The cloud model (name and version) that decided."""
    ts: Seconds
    v: int = 1


_ESC_DECODER: Final = msgspec.msgpack.Decoder(Escalation)
_REPLY_DECODER: Final = msgspec.msgpack.Decoder(Reply)
_ESC_FIELDS: Final = 17
_VERDICT_FIELDS: Final = 6
_REPLY_FIELDS: Final = 9


def make_escalation(
    *,
    id: str,
    node: str,
    model: str,
    release: int,
    device: str,
    sensor: str,
    frame_seq: int,
    ts: float,
    tensor: np.ndarray,
    edge: EdgeVerdict,
    reply_to: str | None = None,
    corr: str | None = None,
    deadline: float | None = None,
    offline: bool = False,
) -> Escalation:
    """Build an escalation from an array; refuses tensors and topics no decoder would accept."""
    name, shape, array = wire_parts(tensor)
    if reply_to is not None:
        validate_topic(reply_to)
    return Escalation(
        id=id,
        node=node,
        model=model,
        release=release,
        device=device,
        sensor=sensor,
        frame_seq=frame_seq,
        ts=ts,
        dtype=name,
        shape=shape,
        data=array.tobytes(),
        edge=edge,
        reply_to=reply_to,
        corr=corr,
        deadline=deadline,
        offline=offline,
    )


def encode_escalation(esc: Escalation) -> bytes:
    """MessagePack of ``esc``. Encoding does not validate; decoding does."""
    return msgspec.msgpack.encode(esc)


def decode_escalation(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Escalation:
    """Decode and validate an escalation, its tensor included.

    Raises only :class:`~schemas.errors.ContractError`.
    """
    budget = (
        1 + 2 * _ESC_FIELDS + 8 + 1 + 2 * _VERDICT_FIELDS + 2 * TOP_MAX + limits.max_extra_items
    )
    esc = decode_msgpack(
        payload, _ESC_DECODER.decode, what="escalation", limits=limits, budget=budget
    )
    check_names(limits, "escalation", (esc.id, esc.node, esc.model, esc.device, esc.sensor))
    if len(esc.edge.top_labels) != len(esc.edge.top_probs):
        raise ContractError("bad_schema", "escalation: top_labels and top_probs differ in length")
    if (esc.reply_to is None) != (esc.corr is None):
        raise ContractError("bad_schema", "escalation: reply_to and corr go together")
    if esc.reply_to is not None:
        validate_topic(esc.reply_to)
    esc.tensor(limits)
    return esc


def encode_reply(reply: Reply) -> bytes:
    """MessagePack of ``reply``. Encoding does not validate; decoding does."""
    return msgspec.msgpack.encode(reply)


def decode_reply(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Reply:
    """Decode and validate a reply; raises only :class:`~schemas.errors.ContractError`."""
    budget = 1 + 2 * _REPLY_FIELDS + limits.max_extra_items
    reply = decode_msgpack(
        payload, _REPLY_DECODER.decode, what="reply", limits=limits, budget=budget
    )
    check_names(limits, "reply", (reply.id, reply.node, reply.worker, reply.model))
    return reply

"""Escalations (edge node -> cloud worker) and their replies (cloud worker -> edge node), both
always a batch: one message carries 1..:data:`CASES_MAX` cases, one reply 1..:data:`CASES_MAX`
verdicts, each naming its case. The replies are :mod:`schemas.replies`; the checks that depend
on :class:`~schemas.limits.Limits` are :mod:`schemas.escalation_checks`.

An escalation message (:class:`EscalationBatch`) carries everything a worker needs, also on an
MQTT 3.1.1 broker: per case the input tensor, the edge model's verdict with a summary of its
probabilities, the case's correlation id and deadline; per message where to reply (``reply_to``
and ``corr``, which an MQTT 5 publish also carries as response topic and correlation data) and
until when the earliest case is worth answering (``deadline``, seconds since the epoch, which an
MQTT 5 publish also carries as message expiry). A *hard-example upload* (cases decided at the
edge while the uplink was down, sent later for retraining) has no ``reply_to``, ``corr`` or
deadlines: nobody waits for it.

A reply (:class:`ReplyBatch`) names the ``node`` that asked, echoes the message's ``corr`` and
the worker that answered; each :class:`CaseVerdict` names its case (``id`` and the case's
``corr``) and gives the cloud's label and confidence and the cloud model. A reply may answer
part of a message's cases (the others were expired, or their handler failed).

Workers and handlers see each case as an :class:`Escalation` (:meth:`EscalationBatch.cases_view`):
the case's fields with the message's ``node``, ``model``, ``ts``, ``reply_to`` and ``offline``.

Both are MessagePack only (no JSON: the producers are our own services). Decoding follows
:mod:`schemas.wire`: size cap, structural pre-scan (its value budget allows at most
:data:`CASES_MAX` cases), version, typed decode (lists longer than :data:`CASES_MAX` are refused
while decoding), then the checks that depend on :class:`~schemas.limits.Limits` (name lengths,
every tensor). An escalation message exactly as msgspec encodes it skips the pre-scan: its
types are closed (unknown fields refused at the key, every list capped from its header, depth
:data:`SCHEMA_DEPTH`), see docs/adr/0033-canonical-fast-path.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Final

import msgspec
import numpy as np
from msgspec import Meta

from .escalation_checks import check_batch
from .fields import Epoch, Fraction, Int64, Level, Name, Seq, Text
from .limits import DEFAULT_LIMITS, Limits
from .tensor import tensor_from_wire, wire_parts
from .topics import validate_topic
from .wire import decode_msgpack, decode_msgpack_canonical, run_decoder

TOP_MAX: Final = 16
"""At most this many (label, probability) pairs summarise the edge model's output."""

CORR_MAX_BYTES: Final = 64
"""Longest correlation id accepted (also as MQTT 5 correlation data)."""

CASES_MAX: Final = 256
"""At most this many cases in one escalation message, and verdicts in one reply."""

Corr = Annotated[str, Meta(min_length=1, max_length=CORR_MAX_BYTES)]
Probability = Fraction
NonNegative = Annotated[float, Meta(ge=0.0, le=1e6)]


class EdgeVerdict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
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


class EscalationCase(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One unsure case inside an :class:`EscalationBatch`."""

    id: Name
    """Unique, time-ordered (the frame's final result id); workers are idempotent by it."""
    release: Seq
    device: Name
    """A topic level, like ``sensor``: checked once per distinct value of the message (by
    :func:`decode_escalations`), not once per case."""
    sensor: Name
    frame_seq: Seq
    dtype: str
    shape: Annotated[list[int], Meta(max_length=8)]
    data: bytes
    edge: EdgeVerdict
    corr: Corr | None = None
    """Correlation id of this case, echoed in its verdict; None in a hard-example upload."""
    deadline: Epoch | None = None
    """No answer to this case is useful after this time (epoch seconds); None: the message's."""


Cases = Annotated[list[EscalationCase], Meta(min_length=1, max_length=CASES_MAX)]


class EscalationBatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One escalation message: 1..CASES_MAX cases of one node and one model."""

    node: Level
    model: Level
    ts: Epoch
    """When the node sent it (seconds since the epoch)."""
    cases: Cases
    reply_to: Text | None = None
    """Topic to publish the reply to (``edge/{node}/reply``); None for a hard-example upload."""
    corr: Corr | None = None
    """Correlation id of the message (also its MQTT 5 correlation data), echoed in the reply."""
    deadline: Epoch | None = None
    """The earliest deadline of the cases (also the MQTT 5 message expiry); None: never."""
    offline: bool = False
    """True for cases the edge decided alone because the uplink was down (``edge_offline``)."""
    v: int = 1

    @property
    def wants_reply(self) -> bool:
        return self.reply_to is not None and self.corr is not None

    def cases_view(self) -> list[Escalation]:
        """Each case with the message's fields, as workers and handlers see it."""
        node, model, ts, reply_to = self.node, self.model, self.ts, self.reply_to
        deadline, offline = self.deadline, self.offline
        # Positional: msgspec matches keyword arguments by name, ~4 x as long for 16 fields.
        views = []
        for c in self.cases:
            view = Escalation(
                c.id, node, model, c.release, c.device, c.sensor, c.frame_seq, ts, c.dtype,
                c.shape, c.data, c.edge, reply_to, c.corr,
                c.deadline if c.deadline is not None else deadline, offline,
            )  # fmt: skip
            views.append(view)
        return views


class Escalation(msgspec.Struct, frozen=True):
    """One case of an escalation message with the message's fields: what a handler gets (see
    :meth:`EscalationBatch.cases_view`). Not sent on its own. Built with its fields in this
    order (or by keyword)."""

    id: str
    node: str
    model: str
    release: int
    device: str
    sensor: str
    frame_seq: int
    ts: float
    dtype: str
    shape: list[int]
    data: bytes
    edge: EdgeVerdict
    reply_to: str | None = None
    corr: str | None = None
    """The case's correlation id."""
    deadline: float | None = None
    """The case's deadline (or the message's)."""
    offline: bool = False

    @property
    def wants_reply(self) -> bool:
        return self.reply_to is not None and self.corr is not None

    def tensor(self, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
        """The input as a read-only array (validated; raises ``ContractError``)."""
        return tensor_from_wire(self.dtype, self.shape, self.data, limits)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


class _LooseVerdict(EdgeVerdict, frozen=True, forbid_unknown_fields=False):
    """:class:`EdgeVerdict` that skips unknown fields (only after the pre-scan)."""


class _LooseCase(EscalationCase, frozen=True, forbid_unknown_fields=False):
    edge: _LooseVerdict


class _LooseBatch(EscalationBatch, frozen=True, forbid_unknown_fields=False):
    cases: Annotated[list[_LooseCase], Meta(min_length=1, max_length=CASES_MAX)]  # type: ignore[assignment]


SCHEMA_DEPTH: Final = 5
"""Containers nested in an escalation message at most (message, cases, case, edge, top_*)."""

_ESC_DECODER: Final = msgspec.msgpack.Decoder(EscalationBatch)
_LOOSE_DECODER: Final = msgspec.msgpack.Decoder(_LooseBatch)
_BATCH_FIELDS: Final = 9
_CASE_FIELDS: Final = 11
_VERDICT_FIELDS: Final = 6


def make_case(
    *,
    id: str,
    release: int,
    device: str,
    sensor: str,
    frame_seq: int,
    tensor: np.ndarray,
    edge: EdgeVerdict,
    corr: str | None = None,
    deadline: float | None = None,
) -> EscalationCase:
    """One case from an array; refuses tensors no decoder would accept."""
    name, shape, array = wire_parts(tensor)
    return EscalationCase(
        id=id,
        release=release,
        device=device,
        sensor=sensor,
        frame_seq=frame_seq,
        dtype=name,
        shape=shape,
        data=array.tobytes(),
        edge=edge,
        corr=corr,
        deadline=deadline,
    )


def make_escalation_batch(
    *,
    node: str,
    model: str,
    ts: float,
    cases: Sequence[EscalationCase],
    reply_to: str | None = None,
    corr: str | None = None,
    offline: bool = False,
) -> EscalationBatch:
    """A message of ``cases``; its ``deadline`` is the earliest of theirs. Refuses reply
    topics no decoder would accept."""
    if reply_to is not None:
        validate_topic(reply_to)
    deadlines = [c.deadline for c in cases if c.deadline is not None]
    return EscalationBatch(
        node=node,
        model=model,
        ts=ts,
        cases=list(cases),
        reply_to=reply_to,
        corr=corr,
        deadline=min(deadlines) if deadlines else None,
        offline=offline,
    )


def encode_escalations(batch: EscalationBatch) -> bytes:
    """MessagePack of ``batch``. Encoding does not validate; decoding does."""
    return msgspec.msgpack.encode(batch)


def decode_escalations(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> EscalationBatch:
    """Decode and validate an escalation message, every case's tensor included.

    A message exactly as msgspec encodes an :class:`EscalationBatch` (what nodes send) is
    decoded once by the closed schema; any other (unknown fields, another encoder, or bad
    input) goes through the pre-scan and a tolerant decode (docs/adr/0033-canonical-fast-path.md).
    Raises only :class:`~schemas.errors.ContractError`.
    """
    batch = decode_msgpack_canonical(
        payload,
        _ESC_DECODER.decode,
        lambda p: _decode_scanned(p, limits),
        limits=limits,
        depth=SCHEMA_DEPTH,
    )
    check_batch(batch, limits)
    return batch


def _decode_scanned(payload: bytes, limits: Limits) -> EscalationBatch:
    """The full pipeline (pre-scan, version, tolerant decode), then the closed types."""
    loose = decode_msgpack(
        payload, _LOOSE_DECODER.decode, what="escalation", limits=limits, budget=_budget(limits)
    )
    # The unknown fields are gone; what is left was validated by the same constraints.
    return run_decoder(_ESC_DECODER.decode, encode_escalations(loose), "escalation")


def _budget(limits: Limits) -> int:
    """The values a message can hold: everything :data:`CASES_MAX` cases may need, plus
    ``limits.max_extra_items`` for fields this version does not know."""
    per_case = 1 + 2 * _CASE_FIELDS + 8 + 1 + 2 * _VERDICT_FIELDS + 2 * TOP_MAX
    return 1 + 2 * _BATCH_FIELDS + CASES_MAX * per_case + limits.max_extra_items

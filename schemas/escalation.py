"""Escalations (edge node -> cloud worker) and their replies (cloud worker -> edge node), both
always a batch: one message carries 1..:data:`CASES_MAX` cases, one reply 1..:data:`CASES_MAX`
verdicts, each naming its case.

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

import re
from collections.abc import Sequence
from typing import Annotated, Any, Final

import msgspec
import numpy as np
from msgspec import Meta

from .errors import ContractError
from .fields import LEVEL_PATTERN, Epoch, Fraction, Int64, Level, Name, Seq, Text, check_names
from .limits import DEFAULT_LIMITS, Limits
from .tensor import check_header, tensor_from_wire, wire_parts
from .topics import validate_topic
from .wire import decode_msgpack, decode_msgpack_canonical, run_decoder

TOP_MAX: Final = 16
"""At most this many (label, probability) pairs summarise the edge model's output."""

CORR_MAX_BYTES: Final = 64
"""Longest correlation id accepted (also as MQTT 5 correlation data)."""

CASES_MAX: Final = 256
"""At most this many cases in one escalation message, and verdicts in one reply."""

_LEVEL: Final = re.compile(LEVEL_PATTERN)
"""What a :data:`~schemas.fields.Level` must match (cases' ``device`` and ``sensor`` are checked
against it once per distinct value of a message)."""

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


class CaseVerdict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The cloud's answer to one case (built with its fields in this order, or by keyword:
    a worker makes one per case, positionally)."""

    id: Name
    """The case this answers."""
    corr: Corr
    """The case's ``corr``."""
    label: Int64
    confidence: Fraction
    model: Name
    """The cloud model (name and version) that decided."""


class ReplyBatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One reply message: verdicts for some or all cases of one escalation message."""

    node: Level
    """The node that asked (a node refuses replies naming another node)."""
    corr: Corr
    """The escalation message's ``corr``."""
    worker: Name
    ts: Epoch
    verdicts: Annotated[list[CaseVerdict], Meta(min_length=1, max_length=CASES_MAX)]
    v: int = 1


class _LooseVerdict(EdgeVerdict, frozen=True, forbid_unknown_fields=False):
    """:class:`EdgeVerdict` that skips unknown fields (only after the pre-scan)."""


class _LooseCase(EscalationCase, frozen=True, forbid_unknown_fields=False):
    edge: _LooseVerdict


class _LooseBatch(EscalationBatch, frozen=True, forbid_unknown_fields=False):
    cases: Annotated[list[_LooseCase], Meta(min_length=1, max_length=CASES_MAX)]  # type: ignore[assignment]


class _LooseCaseVerdict(CaseVerdict, frozen=True, forbid_unknown_fields=False):
    """:class:`CaseVerdict` that skips unknown fields (only after the pre-scan)."""


class _LooseReply(ReplyBatch, frozen=True, forbid_unknown_fields=False):
    verdicts: Annotated[list[_LooseCaseVerdict], Meta(min_length=1, max_length=CASES_MAX)]  # type: ignore[assignment]


SCHEMA_DEPTH: Final = 5
"""Containers nested in an escalation message at most (message, cases, case, edge, top_*)."""

REPLY_SCHEMA_DEPTH: Final = 3
"""Containers nested in a reply message at most (message, verdicts, verdict)."""

_ESC_DECODER: Final = msgspec.msgpack.Decoder(EscalationBatch)
_LOOSE_DECODER: Final = msgspec.msgpack.Decoder(_LooseBatch)
_REPLY_DECODER: Final = msgspec.msgpack.Decoder(ReplyBatch)
_LOOSE_REPLY_DECODER: Final = msgspec.msgpack.Decoder(_LooseReply)
_BATCH_FIELDS: Final = 9
_CASE_FIELDS: Final = 11
_VERDICT_FIELDS: Final = 6
_REPLY_FIELDS: Final = 6
_CASE_VERDICT_FIELDS: Final = 5


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
    _check_batch(batch, limits)
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


def _check_batch(batch: EscalationBatch, limits: Limits) -> None:
    check_names(limits, "escalation", (batch.node, batch.model))
    if (batch.reply_to is None) != (batch.corr is None):
        raise ContractError("bad_schema", "escalation: reply_to and corr go together")
    if batch.reply_to is not None:
        validate_topic(batch.reply_to)
    if not _cases_look_right(batch, limits):
        _find_bad_case(batch, limits)
    _check_tensors(batch.cases, limits)


def _cases_look_right(batch: EscalationBatch, limits: Limits) -> bool:
    """True when every case passes :func:`_find_bad_case` (one pass, no error detail)."""
    cases = batch.cases
    cap = limits.max_str_len
    no_corr = batch.corr is None
    if len({c.id for c in cases}) != len(cases) or not all(
        len(c.id) <= cap
        and len(c.device) <= cap
        and len(c.sensor) <= cap
        and len(c.edge.top_labels) == len(c.edge.top_probs)
        and (c.corr is None) == no_corr
        for c in cases
    ):
        return False
    levels = {c.device for c in cases}
    levels.update([c.sensor for c in cases])
    return all(_LEVEL.search(level) for level in levels)


def _find_bad_case(batch: EscalationBatch, limits: Limits) -> None:
    """Raise for the first case (in order) that breaks a rule."""
    ids: set[str] = set()
    for c in batch.cases:
        check_names(limits, "escalation case", (c.id, c.device, c.sensor))
        if c.id in ids:
            raise ContractError("bad_schema", f"escalation: case {c.id[:40]!r} twice")
        ids.add(c.id)
        if len(c.edge.top_labels) != len(c.edge.top_probs):
            raise ContractError(
                "bad_schema", "escalation: top_labels and top_probs differ in length"
            )
        if (c.corr is None) != (batch.corr is None):
            raise ContractError(
                "bad_schema", "escalation: every case has a corr when the message wants a reply"
            )
        for what, level in (("device", c.device), ("sensor", c.sensor)):
            if not _LEVEL.search(level):
                raise ContractError(
                    "bad_schema",
                    f"escalation case {c.id[:40]!r}: {what} {level[:64]!r} is not a topic level"
                    " (no '/', '+', '#', control characters or leading '$')",
                )


def _check_tensors(cases: list[EscalationCase], limits: Limits) -> None:
    """Every case's tensor, as :func:`~schemas.tensor.tensor_from_wire` checks one (dtype,
    shape, element count, data length, finite floats), each header once per message and the
    float data of cases that share a header in one pass."""
    first = cases[0]
    dtype, shape = first.dtype, first.shape
    if all(c.dtype == dtype and c.shape == shape for c in cases):  # the usual message
        dt, _, count = check_header(dtype, shape, limits)
        nbytes = count * dt.itemsize
        if all(len(c.data) == nbytes for c in cases):
            if dt.kind == "f":
                values = np.frombuffer(b"".join([c.data for c in cases]), dtype=dt)
                if not np.isfinite(values).all():
                    raise ContractError("non_finite", f"{dt.name} data holds NaN or infinity")
            return
    headers: dict[tuple[str, tuple[int, ...]], tuple[np.dtype[Any], int]] = {}
    floats: dict[tuple[str, tuple[int, ...]], list[bytes]] = {}
    for c in cases:
        key = (c.dtype, tuple(c.shape))
        known = headers.get(key)
        if known is None:
            dt, _, count = check_header(c.dtype, c.shape, limits)
            known = headers[key] = (dt, count * dt.itemsize)
        dt, nbytes = known
        if len(c.data) != nbytes:
            raise ContractError(
                "bad_shape",
                f"data is {len(c.data)} bytes, shape {list(c.shape)} of {dt.name} needs {nbytes}",
            )
        if dt.kind == "f":
            floats.setdefault(key, []).append(c.data)
    for key, chunks in floats.items():
        values = np.frombuffer(b"".join(chunks), dtype=headers[key][0])
        if not np.isfinite(values).all():
            raise ContractError("non_finite", f"{values.dtype.name} data holds NaN or infinity")


def encode_replies(reply: ReplyBatch) -> bytes:
    """MessagePack of ``reply``. Encoding does not validate; decoding does."""
    return msgspec.msgpack.encode(reply)


def decode_replies(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> ReplyBatch:
    """Decode and validate a reply message; raises only :class:`~schemas.errors.ContractError`.

    Like :func:`decode_escalations`, a reply exactly as msgspec encodes a :class:`ReplyBatch`
    (what workers send) is decoded once by the closed schema, any other through the pre-scan.
    """
    reply = decode_msgpack_canonical(
        payload,
        _REPLY_DECODER.decode,
        lambda p: _decode_reply_scanned(p, limits),
        limits=limits,
        depth=REPLY_SCHEMA_DEPTH,
    )
    _check_reply(reply, limits)
    return reply


def _check_reply(reply: ReplyBatch, limits: Limits) -> None:
    check_names(limits, "reply", (reply.node, reply.worker))
    for v in reply.verdicts:
        check_names(limits, "reply verdict", (v.id, v.model))


def _reply_budget(limits: Limits) -> int:
    budget = 1 + 2 * _REPLY_FIELDS + CASES_MAX * (1 + 2 * _CASE_VERDICT_FIELDS)
    return budget + limits.max_extra_items


def _decode_reply_scanned(payload: bytes, limits: Limits) -> ReplyBatch:
    """The full pipeline (pre-scan, version, tolerant decode), then the closed types."""
    loose = decode_msgpack(
        payload, _LOOSE_REPLY_DECODER.decode, what="reply", limits=limits,
        budget=_reply_budget(limits),
    )  # fmt: skip
    return run_decoder(_REPLY_DECODER.decode, encode_replies(loose), "reply")

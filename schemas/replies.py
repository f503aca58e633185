"""Replies to escalations (cloud worker -> edge node): one message answers 1..:data:`CASES_MAX`
cases of one escalation message (see :mod:`schemas.escalation`).

A reply (:class:`ReplyBatch`) names the ``node`` that asked, echoes the message's ``corr`` and
the worker that answered; each :class:`CaseVerdict` names its case (``id`` and the case's
``corr``) and gives the cloud's label and confidence and the cloud model. MessagePack only;
decoded like an escalation message: a reply exactly as msgspec encodes it through the closed
schema, any other through the pre-scan and a tolerant decode.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from msgspec import Meta

from .escalation import CASES_MAX, Corr
from .fields import Epoch, Fraction, Int64, Level, Name, check_names
from .limits import DEFAULT_LIMITS, Limits
from .wire import decode_msgpack, decode_msgpack_canonical, run_decoder


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


class _LooseCaseVerdict(CaseVerdict, frozen=True, forbid_unknown_fields=False):
    """:class:`CaseVerdict` that skips unknown fields (only after the pre-scan)."""


class _LooseReply(ReplyBatch, frozen=True, forbid_unknown_fields=False):
    verdicts: Annotated[list[_LooseCaseVerdict], Meta(min_length=1, max_length=CASES_MAX)]  # type: ignore[assignment]


REPLY_SCHEMA_DEPTH: Final = 3
"""Containers nested in a reply message at most (message, verdicts, verdict)."""

_REPLY_DECODER: Final = msgspec.msgpack.Decoder(ReplyBatch)
_LOOSE_REPLY_DECODER: Final = msgspec.msgpack.Decoder(_LooseReply)
_REPLY_FIELDS: Final = 6
_CASE_VERDICT_FIELDS: Final = 5


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

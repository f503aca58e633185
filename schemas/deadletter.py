"""A rejected input, as reported on the node's dead-letter topic."""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from msgspec import Meta

from .fields import Epoch, Level, Name, Seq, Text, check_names
from .limits import DEFAULT_LIMITS, Limits
from .wire import decode_msgpack

PAYLOAD_HEAD_MAX: Final = 64


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    node: Level
    id: Name
    seq: Seq
    """Per-node counter of dead letters."""
    ts: Epoch
    topic: Text
    """Where the rejected message arrived (callers may shorten it)."""
    reason: Name
    """The :class:`~schemas.errors.ContractError` reason code (or another short code)."""
    detail: Text
    payload_bytes: Seq
    """Length of the rejected payload."""
    payload_head: Annotated[bytes, Meta(max_length=PAYLOAD_HEAD_MAX)]
    """Its first <= 64 bytes (callers slice them)."""
    v: int = 1


_DECODER: Final = msgspec.msgpack.Decoder(DeadLetter)
_FIELDS: Final = 10


def encode_deadletter(d: DeadLetter) -> bytes:
    """MessagePack of ``d``. Encoding does not validate; :func:`decode_deadletter` does."""
    return msgspec.msgpack.encode(d)


def decode_deadletter(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> DeadLetter:
    """Decode and validate a dead letter; raises only :class:`~schemas.errors.ContractError`."""
    budget = 1 + 2 * _FIELDS + limits.max_extra_items
    letter = decode_msgpack(
        payload, _DECODER.decode, what="deadletter", limits=limits, budget=budget
    )
    check_names(limits, "deadletter", (letter.node, letter.id, letter.reason))
    return letter

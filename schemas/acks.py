"""Confirmations of results messages: what a consumer publishes on ``edge/{node}/acks`` in
end-to-end mode (docs/adr/0078-end-to-end-acks.md).

A consumer (the bridge, once the message is in its durable queue; or a sink, once it has stored
the results) names each results message it has durably taken by its *message id*: the ``id`` of
the message's first result (:func:`message_id`; result ids are unique, and a result is in one
results message only). The node deletes a results message from its outbox only once a
confirmation names it; until then it sends it again now and then (at least once: consumers
deduplicate by result id).

MessagePack (or JSON, first non-whitespace byte ``{``) map::

    {"ids": ["0192…", …], "by": "bridge-s1", "v": 1}

``ids`` holds 1 to :data:`ACK_IDS_MAX` message ids, each at most ``limits.max_str_len``
characters; ``by`` (optional) names the consumer, for logs. A payload larger than
:data:`ACK_MAX_BYTES` is refused before a byte of it is read.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from .fields import Level, Name, check_names
from .limits import DEFAULT_LIMITS, Limits
from .results import ResultBatch
from .wire import check_size, decode_json, decode_msgpack, is_json_object

ACK_IDS_MAX: Final = 1024
"""Message ids one confirmation may carry."""
ACK_MAX_BYTES: Final = 64 * 1024
"""The largest confirmation accepted: 1,024 ids of 36 characters take ~39 KiB (MessagePack),
~40 KiB (JSON)."""


class ResultAcks(msgspec.Struct, frozen=True, kw_only=True):
    ids: Annotated[list[Name], Meta(min_length=1, max_length=ACK_IDS_MAX)]
    """Message ids (:func:`message_id`) of the results messages the consumer has taken."""
    by: Level | None = None
    """Who confirms (a bridge id, a sink's name): for logs only."""
    v: int = 1


_MSGPACK: Final = msgspec.msgpack.Decoder(ResultAcks)
_JSON: Final = msgspec.json.Decoder(ResultAcks)
_FIELDS: Final = 3


def message_id(batch: ResultBatch) -> str:
    """The id a results message is confirmed by: its first result's id."""
    return batch.results[0].id


def encode_acks(acks: ResultAcks, *, as_json: bool = False) -> bytes:
    """MessagePack (or JSON) of ``acks``. Encoding does not validate; decoding does."""
    return msgspec.json.encode(acks) if as_json else msgspec.msgpack.encode(acks)


def _ack_limits(limits: Limits) -> Limits:
    if limits.max_payload_bytes <= ACK_MAX_BYTES:
        return limits
    return dataclasses.replace(limits, max_payload_bytes=ACK_MAX_BYTES)


def decode_acks(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> ResultAcks:
    """Decode and validate a confirmation; raises only :class:`~schemas.errors.ContractError`.

    Size first (at most :data:`ACK_MAX_BYTES`), then a pre-scan that refuses more values than
    :data:`ACK_IDS_MAX` ids and the other fields can hold, then the schema (1 to
    :data:`ACK_IDS_MAX` non-empty ids), then each name's length.
    """
    limits = _ack_limits(limits)
    payload = check_size(payload, limits)
    budget = 1 + 2 * _FIELDS + ACK_IDS_MAX + limits.max_extra_items
    if is_json_object(payload):
        acks = decode_json(payload, _JSON.decode, what="acks", limits=limits, budget=budget)
    else:
        acks = decode_msgpack(payload, _MSGPACK.decode, what="acks", limits=limits, budget=budget)
    check_names(limits, "acks", acks.ids)
    check_names(limits, "acks", [acks.by])
    return acks

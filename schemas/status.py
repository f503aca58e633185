"""A node's health, published retained (and as its MQTT will, with state ``offline``)."""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from .fields import REASONS_MAX, Epoch, Level, Name, Seq, check_names
from .limits import DEFAULT_LIMITS, Limits
from .wire import decode_msgpack

State = Literal["online", "offline", "degraded"]


class Status(msgspec.Struct, frozen=True, kw_only=True):
    node: Level
    state: State
    ts: Epoch
    """When the node said so (its clock), seconds since the epoch."""
    reasons: Annotated[list[Name], Meta(max_length=REASONS_MAX)] = []
    """Why it is degraded/offline, as short codes (e.g. ``no_model``)."""
    model: Level | None = None
    release: Seq | None = None
    runtime: Name | None = None
    provider: Name | None = None
    hardware_class: Level | None = None
    """The node's hardware class (``hardware_class`` in its config)."""
    boot_id: Name | None = None
    v: int = 1


_DECODER: Final = msgspec.msgpack.Decoder(Status)
_FIELDS: Final = 11


def encode_status(s: Status) -> bytes:
    """MessagePack of ``s``. Encoding does not validate; :func:`decode_status` does."""
    return msgspec.msgpack.encode(s)


def decode_status(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Status:
    """Decode and validate a status; raises only :class:`~schemas.errors.ContractError`."""
    budget = 1 + 2 * _FIELDS + REASONS_MAX + limits.max_extra_items
    status = decode_msgpack(payload, _DECODER.decode, what="status", limits=limits, budget=budget)
    check_names(
        limits,
        "status",
        [status.node, status.model, status.runtime, status.provider, status.hardware_class],
    )
    check_names(limits, "status", [status.boot_id, *status.reasons])
    return status

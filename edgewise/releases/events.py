"""What a node reports on ``edge/{node}/events`` about updates, keys and commands.

The last event is also retained on that topic, so ``edgewise model status`` sees every node's
latest state without waiting for the next one.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from edgewise.releases.wire import MAX_DEPTH, Level, Release, Short, Time
from schemas import ContractError
from schemas.scan_msgpack import scan_msgpack

EventKind = Literal[
    "keys_updated",
    "keys_rejected",
    "downloading",
    "verified",
    "validating",
    "activated",
    "committed",
    "rolled_back",
    "abandoned",
    "rejected",
    "command_done",
    "command_rejected",
]
EVENT_KINDS: Final = frozenset(EventKind.__args__)  # type: ignore[attr-defined]
MAX_EVENT_BYTES: Final = 8192


class UpdateEvent(msgspec.Struct, frozen=True, kw_only=True):
    id: Short
    node: Level
    ts: Time
    kind: EventKind
    model: Level | None = None
    release: Release | None = None
    running_release: Release | None = None
    """The release the node serves after this event."""
    reason: Short | None = None
    """A :class:`~edgewise.releases.reasons.Reason` value for rejections and rollbacks."""
    detail: Annotated[str, Meta(max_length=1024)] = ""
    ref: Short | None = None
    """The manifest or command id, or the key-set version, this event is about."""
    v: int = 1


_DECODER: Final = msgspec.msgpack.Decoder(UpdateEvent)


def encode_event(event: UpdateEvent) -> bytes:
    return msgspec.msgpack.encode(event)


def decode_event(payload: bytes) -> UpdateEvent:
    """Decode an event (size, depth and schema checked); raises :class:`ContractError`."""
    if len(payload) > MAX_EVENT_BYTES:
        raise ContractError("payload_too_large", f"{len(payload)} bytes > {MAX_EVENT_BYTES}")
    scan_msgpack(bytes(payload), max_depth=MAX_DEPTH, max_items=64)
    try:
        return _DECODER.decode(payload)
    except msgspec.ValidationError as exc:
        raise ContractError("bad_schema", f"update event: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ContractError("malformed", f"update event: {exc}") from None

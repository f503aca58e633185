"""The decoding pipeline every message shares: size cap, structural pre-scan, version,
typed decode, and the mapping of decoder failures onto reason codes.

* ``payload_too_large``: more bytes than ``limits.max_payload_bytes``; nothing is read.
* ``malformed``: not one well-formed MessagePack/JSON value within the depth and value
  caps (see :mod:`schemas.scan_msgpack`, :mod:`schemas.scan_json`).
* ``bad_version``: a ``v`` other than :data:`VERSION`; checked before the rest of the
  schema, since another version may have another schema.
* ``bad_schema``: well-formed, but a field is missing, of the wrong type or out of range.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, TypeVar

import msgspec

from .errors import ContractError
from .limits import Limits
from .scan_json import scan_json
from .scan_msgpack import scan_msgpack

VERSION: Final = 1

T = TypeVar("T")

_JSON_OBJECT_START: Final = re.compile(rb"[ \t\r\n]*\{")


class _Versioned(msgspec.Struct):
    v: int


_MSGPACK_VERSION: Final = msgspec.msgpack.Decoder(_Versioned)
_JSON_VERSION: Final = msgspec.json.Decoder(_Versioned)


def check_size(payload: bytes, limits: Limits) -> bytes:
    """Refuse oversized payloads before reading a byte; returns ``payload`` as ``bytes``."""
    if len(payload) > limits.max_payload_bytes:
        raise ContractError(
            "payload_too_large", f"{len(payload)} bytes > {limits.max_payload_bytes}"
        )
    if type(payload) is not bytes:
        payload = bytes(payload)
    return payload


def is_json_object(payload: bytes) -> bool:
    """True when the first non-whitespace byte is ``{`` (a MessagePack map never is)."""
    return _JSON_OBJECT_START.match(payload) is not None


def decode_msgpack(
    payload: bytes, decode: Callable[[bytes], T], *, what: str, limits: Limits, budget: int
) -> T:
    """Size-check, pre-scan, version-check and decode one MessagePack message."""
    payload = check_size(payload, limits)
    scan_msgpack(payload, max_depth=limits.max_depth, max_items=budget)
    _check_version(run_decoder(_MSGPACK_VERSION.decode, payload, what).v, what)
    return run_decoder(decode, payload, what)


def decode_json(
    payload: bytes, decode: Callable[[bytes], T], *, what: str, limits: Limits, budget: int
) -> T:
    """Size-check, pre-scan, version-check and decode one JSON message."""
    payload = check_size(payload, limits)
    scan_json(payload, max_depth=limits.max_depth, max_items=budget)
    _check_version(run_decoder(_JSON_VERSION.decode, payload, what).v, what)
    return run_decoder(decode, payload, what)


def _check_version(v: int, what: str) -> None:
    if v != VERSION:
        raise ContractError("bad_version", f"{what} v={v}; this decoder speaks v={VERSION}")


def run_decoder(decode: Callable[[bytes], T], payload: bytes, what: str) -> T:
    """Run a msgspec decode, turning its failures into ``bad_schema`` / ``malformed``."""
    try:
        return decode(payload)
    except msgspec.ValidationError as exc:  # before DecodeError: it is a subclass
        raise ContractError("bad_schema", f"{what}: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ContractError("malformed", f"{what}: {exc}") from None

"""The decoding pipeline every message shares: size cap, structural pre-scan, version,
typed decode, and the mapping of decoder failures onto reason codes.

* ``payload_too_large``: more bytes than ``limits.max_payload_bytes``; nothing is read.
* ``malformed``: not one well-formed MessagePack/JSON value within the depth and value
  caps (see :mod:`schemas.scan_msgpack`, :mod:`schemas.scan_json`).
* ``bad_version``: a ``v`` other than :data:`VERSION`; checked before the rest of the
  schema, since another version may have another schema.
* ``bad_schema``: well-formed, but a field is missing, of the wrong type or out of range.

:func:`decode_msgpack_canonical` puts a fast path in front of :func:`decode_msgpack` for closed
schemas whose senders are our own msgspec encoders (docs/adr/0033-canonical-fast-path.md).
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
_ENCODER: Final = msgspec.msgpack.Encoder()
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


def decode_msgpack_canonical(
    payload: bytes,
    decode_closed: Callable[[bytes], T],
    fallback: Callable[[bytes], T],
    *,
    limits: Limits,
    depth: int,
) -> T:
    """Decode ``payload`` with ``decode_closed`` and accept it if it is exactly the canonical
    encoding of what came out; anything else goes to ``fallback`` (the full pipeline).

    ``decode_closed`` must decode a *closed* schema: every struct ``forbid_unknown_fields`` (an
    unknown key is refused before its value is read), every list ``Meta(max_length=...)``
    (checked against the array header before any element is decoded), no recursive or ``Any``
    types, ``depth`` levels of containers at most; and ``fallback``'s value budget must cover
    what that schema can hold. Then this decode is depth- and length-capped while it runs, and
    what it accepts (well-formed, version :data:`VERSION`, canonical, so no duplicate keys and
    no extra values) is exactly what the pre-scan and the typed decode of ``fallback`` accept,
    as the same object. Size is checked first, as everywhere.
    """
    payload = check_size(payload, limits)
    if limits.max_depth >= depth:
        try:
            message = decode_closed(payload)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            pass  # ValidationError included: the fallback says why, with the usual reason
        else:
            if getattr(message, "v", None) == VERSION and _ENCODER.encode(message) == payload:
                return message
    return fallback(payload)


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

"""Generic decoding for display (``edgewise watch``): any MessagePack or JSON value, under
the same caps as typed messages, since the payload is just as untrusted."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

import msgspec

from .errors import ContractError
from .limits import DEFAULT_LIMITS, Limits
from .scan_json import scan_json
from .scan_msgpack import scan_msgpack
from .wire import check_size, run_decoder

_JSON_CONTAINER_START: Final = re.compile(rb"[ \t\r\n]*[\[{]")
_MSGPACK: Final = msgspec.msgpack.Decoder()
_JSON: Final = msgspec.json.Decoder()


def decode_any(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> object:
    """Decode a payload of unknown shape into dicts, lists, str, bytes, int, float, bool
    and None.

    JSON if the first non-whitespace byte is ``{`` or ``[``, else MessagePack. Caps: size
    (``payload_too_large``); nesting ``limits.max_depth`` and ``limits.max_items`` values in
    total, checked before any object is built. Every other failure (syntax, truncation,
    trailing bytes, invalid UTF-8, ext types, non-string map keys, numbers out of range)
    is ``malformed``; :class:`~schemas.errors.ContractError` is the only exception raised.
    """
    payload = check_size(payload, limits)
    decode: Callable[[bytes], object]
    if _JSON_CONTAINER_START.match(payload):
        scan_json(payload, max_depth=limits.max_depth, max_items=limits.max_items)
        decode = _JSON.decode
    else:
        scan_msgpack(payload, max_depth=limits.max_depth, max_items=limits.max_items)
        decode = _MSGPACK.decode
    try:
        return run_decoder(decode, payload, "payload")
    except ContractError as exc:
        if exc.reason == "bad_schema":  # e.g. a JSON number beyond float range
            raise ContractError("malformed", exc.detail) from None
        raise

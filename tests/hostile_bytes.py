"""Hostile MessagePack pieces and byte mutations shared by the decoders' tests."""

from __future__ import annotations

import struct
from typing import Any

from schemas import ContractError

DEEP = b"\x91" * 500_000 + b"\x00"  # half a million nested one-element arrays
HUGE_CLAIM = b"\xdd\xff\xff\xff\xff"  # array32 claiming 2**32-1 entries, none there
MILLION = b"\xdd" + struct.pack(">I", 1_000_000) + b"\x00" * 1_000_000  # a real 1M-entry list

HOWS = ("flip", "insert", "delete", "truncate", "none")


def with_raw_field(encoded_map: bytes, name: bytes, raw_value: bytes) -> bytes:
    """``encoded_map`` (a fixmap) with one more key, whose value is ``raw_value`` as is."""
    assert 0x80 <= encoded_map[0] < 0x8F
    key = bytes([0xA0 + len(name)]) + name
    return bytes([encoded_map[0] + 1]) + encoded_map[1:] + key + raw_value


def mutate(case: tuple[bytes, int, int, str]) -> bytes:
    """(base, position, byte, how): flip, insert or delete one byte, truncate, or leave it."""
    base, at, byte, how = case
    at %= len(base)
    if how == "flip":
        return base[:at] + bytes([byte]) + base[at + 1 :]
    if how == "insert":
        return base[:at] + bytes([byte]) + base[at:]
    if how == "delete":
        return base[:at] + base[at + 1 :]
    if how == "truncate":
        return base[:at]
    return base


def outcome(decode: Any, payload: bytes) -> Any:
    """What ``decode(payload)`` returns, or (reason, detail) of its ContractError."""
    try:
        return decode(payload)
    except ContractError as exc:
        return (exc.reason, exc.detail)

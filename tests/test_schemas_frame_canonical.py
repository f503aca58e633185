"""Frames skip the generic pre-scan when they are exactly what `encode_frame` writes
(docs/adr/0066-canonical-frames.md). Hostile frames must still be refused with a clear
ContractError, with little memory, without the closed decoder walking into what it refuses; and
the fast path must accept exactly what the full pipeline accepts, as the same frame.

Payloads are built before measuring, so the tracemalloc peak is what decoding allocated.
"""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from schemas import ContractError, Frame, Limits, decode_frame, encode_frame
from schemas.errors import ReasonCode
from schemas.frame import _CANONICAL, RANK_MAX, SCHEMA_DEPTH, _decode_msgpack_scanned
from schemas.scan_msgpack import scan_msgpack
from schemas.wire import is_json_object

KiB = 1024
IMAGE = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
DEEP = b"\x91" * 500_000 + b"\x00"  # half a million nested one-element arrays
HUGE_CLAIM = b"\xdd\xff\xff\xff\xff"  # array32 claiming 2**32-1 entries, none there
MILLION = b"\xdd" + struct.pack(">I", 1_000_000) + b"\x00" * 1_000_000  # a real 1M-entry list


def _frame(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 1, "seq": 42, "ts": 1766400000.125, "dtype": "float32", "shape": [8, 8],
        "data": IMAGE.tobytes(),
    }  # fmt: skip
    return base | fields


def _with_raw_field(encoded_map: bytes, name: bytes, raw_value: bytes) -> bytes:
    """``encoded_map`` (a fixmap) with one more key, whose value is ``raw_value`` as is."""
    assert 0x80 <= encoded_map[0] < 0x8F
    key = bytes([0xA0 + len(name)]) + name
    return bytes([encoded_map[0] + 1]) + encoded_map[1:] + key + raw_value


def refused(payload: bytes, limits: Limits | None = None) -> tuple[ReasonCode, str, int]:
    """(reason, detail, peak bytes allocated while decoding)."""
    tracemalloc.start()
    try:
        decode_frame(payload, limits or Limits())
    except ContractError as exc:
        return exc.reason, exc.detail, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pytest.fail(f"{payload[:40]!r}... was accepted")


def test_what_encode_frame_writes_is_canonical() -> None:
    for ts in (1766400000.125, None):
        frame = Frame(seq=7, ts=ts, tensor=IMAGE)
        payload = encode_frame(frame)
        closed = _CANONICAL.decode(payload)
        assert msgspec.msgpack.encode(closed) == payload  # so the fast path takes it
        assert decode_frame(payload) == frame


@pytest.mark.parametrize(
    "value", [DEEP, HUGE_CLAIM, MILLION], ids=["500k-deep", "2**32-claim", "1M-list"]
)
def test_unknown_field_deep_or_huge(value: bytes) -> None:
    payload = _with_raw_field(msgspec.msgpack.encode(_frame()), b"x", value)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        _CANONICAL.decode(payload)  # refused at the key: the value is never read
    reason, detail, peak = refused(payload)
    assert reason == "malformed", detail  # the pre-scan's verdict, as before the fast path
    assert peak < 64 * KiB


@pytest.mark.parametrize("value", [HUGE_CLAIM, MILLION], ids=["2**32-claim", "1M-list"])
def test_shape_far_over_its_cap(value: bytes) -> None:
    frame = _frame()
    del frame["shape"]
    payload = _with_raw_field(msgspec.msgpack.encode(frame), b"shape", value)
    with pytest.raises(msgspec.ValidationError, match="length"):
        _CANONICAL.decode(payload)  # from the array header, before any element
    reason, detail, peak = refused(payload)
    assert reason == "malformed", detail
    assert peak < 64 * KiB


def test_data_claiming_2_gib() -> None:
    frame = _frame()
    del frame["data"]
    payload = _with_raw_field(msgspec.msgpack.encode(frame), b"data", b"\xc6\x7f\xff\xff\xff")
    reason, detail, peak = refused(payload)
    assert reason == "malformed", detail
    assert peak < 64 * KiB


def test_duplicate_keys_take_the_full_pipeline() -> None:
    # msgspec keeps the last of duplicate keys: such a payload is not canonical, so the
    # pre-scan counts every value, as before: one duplicate passes, past the budget they fail.
    one = msgspec.msgpack.encode(_frame())
    two = _with_raw_field(one, b"seq", msgspec.msgpack.encode(5))
    assert msgspec.msgpack.encode(_CANONICAL.decode(two)) != two
    assert decode_frame(two).seq == 5
    many = one
    for _ in range(9):  # a fixmap holds 15 keys
        many = _with_raw_field(many, b"seq", b"\x05")
    assert _CANONICAL.decode(many).seq == 5  # the closed schema alone would accept it
    reason, detail, _ = refused(many, Limits(max_extra_items=8))
    assert reason == "malformed" and "values" in detail


def test_other_encoders_key_order_still_decodes() -> None:
    reordered = {"data": IMAGE.tobytes(), "shape": [8, 8], "dtype": "float32", "seq": 42, "v": 1}
    payload = msgspec.msgpack.encode(reordered)
    assert msgspec.msgpack.encode(_CANONICAL.decode(payload)) != payload
    assert decode_frame(payload) == Frame(seq=42, ts=None, tensor=IMAGE)


def test_an_explicit_nil_ts_is_not_canonical_but_decodes() -> None:
    payload = msgspec.msgpack.encode(_frame(ts=None))
    assert msgspec.msgpack.encode(_CANONICAL.decode(payload)) != payload
    assert decode_frame(payload).ts is None


def test_rank_over_the_limit_has_the_same_reason_on_both_paths() -> None:
    shape = [1] * 6
    payload = msgspec.msgpack.encode(_frame(shape=shape, data=np.zeros(1, np.float32).tobytes()))
    assert msgspec.msgpack.encode(_CANONICAL.decode(payload)) == payload  # canonical
    assert refused(payload, Limits(max_rank=4))[0] == "bad_shape"
    with pytest.raises(ContractError) as full:
        _decode_msgpack_scanned(payload, Limits(max_rank=4))
    assert full.value.reason == "bad_shape"


def test_schema_depth_is_what_the_schema_holds() -> None:
    payload = encode_frame(Frame(seq=1, ts=1.0, tensor=np.zeros([1] * RANK_MAX, np.float32)))
    scan_msgpack(payload, max_depth=SCHEMA_DEPTH, max_items=10**6)
    with pytest.raises(ContractError, match="nested deeper"):
        scan_msgpack(payload, max_depth=SCHEMA_DEPTH - 1, max_items=10**6)
    # Below the schema's depth the fast path is off and the pre-scan refuses.
    assert refused(payload, Limits(max_depth=SCHEMA_DEPTH - 1, max_rank=RANK_MAX))[0] == "malformed"


# The fast path and the full pipeline agree on everything.

base_payloads = st.builds(
    lambda extra, drop: msgspec.msgpack.encode(
        {k: v for k, v in (_frame() | extra).items() if k not in drop}
    ),
    st.sampled_from(
        [
            {},
            {"later": 1},
            {"shape": [8, 8, 1]},
            {"ts": None},
            {"dtype": "uint8", "data": bytes(64)},
            {"data": np.full(64, np.nan, np.float32).tobytes()},
        ]
    ),
    st.sampled_from([(), ("ts",), ("seq",), ("data",)]),
)
mutations = st.tuples(
    base_payloads,
    st.integers(0, 10_000),
    st.integers(0, 255),
    st.sampled_from(["flip", "insert", "delete", "truncate", "none"]),
)


def _mutate(case: tuple[bytes, int, int, str]) -> bytes:
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


def _outcome(decode: Any, payload: bytes) -> Frame | tuple[str, str]:
    try:
        result: Frame = decode(payload, Limits())
    except ContractError as exc:
        return (exc.reason, exc.detail)
    return result


@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow])
@given(mutations.map(_mutate))
def test_fast_path_accepts_exactly_what_the_full_pipeline_accepts(payload: bytes) -> None:
    assume(not is_json_object(payload))  # a flip to "{" makes it a JSON frame: another path
    fast = _outcome(decode_frame, payload)
    full = _outcome(_decode_msgpack_scanned, payload)
    if isinstance(full, tuple):
        assert isinstance(fast, tuple) and fast[0] == full[0], (fast, full)
    else:
        assert fast == full and isinstance(fast, Frame)

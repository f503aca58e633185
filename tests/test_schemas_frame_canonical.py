"""Frames skip the generic pre-scan when they are exactly what `encode_frame` writes
(docs/adr/0066-canonical-frames.md). Hostile frames must still be refused with a clear
ContractError, with little memory, without the closed decoder walking into what it refuses; and
the fast path must accept exactly what the full pipeline accepts, as the same frame.

Payloads are built before measuring, so the tracemalloc peak is what decoding allocated.
"""

from __future__ import annotations

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
from tests.hostile_bytes import DEEP, HUGE_CLAIM, MILLION, mutate, outcome, with_raw_field

KiB = 1024
IMAGE = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)


def _frame(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 1, "seq": 42, "ts": 1766400000.125, "dtype": "float32", "shape": [8, 8],
        "data": IMAGE.tobytes(),
    }  # fmt: skip
    return base | fields


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
    payload = with_raw_field(msgspec.msgpack.encode(_frame()), b"x", value)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        _CANONICAL.decode(payload)  # refused at the key: the value is never read
    reason, detail, peak = refused(payload)
    assert reason == "malformed", detail  # the pre-scan's verdict, as before the fast path
    assert peak < 64 * KiB


@pytest.mark.parametrize("value", [HUGE_CLAIM, MILLION], ids=["2**32-claim", "1M-list"])
def test_shape_far_over_its_cap(value: bytes) -> None:
    frame = _frame()
    del frame["shape"]
    payload = with_raw_field(msgspec.msgpack.encode(frame), b"shape", value)
    with pytest.raises(msgspec.ValidationError, match="length"):
        _CANONICAL.decode(payload)  # from the array header, before any element
    reason, detail, peak = refused(payload)
    assert reason == "malformed", detail
    assert peak < 64 * KiB


def test_data_claiming_2_gib() -> None:
    frame = _frame()
    del frame["data"]
    payload = with_raw_field(msgspec.msgpack.encode(frame), b"data", b"\xc6\x7f\xff\xff\xff")
    reason, detail, peak = refused(payload)
    assert reason == "malformed", detail
    assert peak < 64 * KiB


def test_duplicate_keys_take_the_full_pipeline() -> None:
    # msgspec keeps the last of duplicate keys: such a payload is not canonical, so the
    # pre-scan counts every value, as before: one duplicate passes, past the budget they fail.
    one = msgspec.msgpack.encode(_frame())
    two = with_raw_field(one, b"seq", msgspec.msgpack.encode(5))
    assert msgspec.msgpack.encode(_CANONICAL.decode(two)) != two
    assert decode_frame(two).seq == 5
    many = one
    for _ in range(9):  # a fixmap holds 15 keys
        many = with_raw_field(many, b"seq", b"\x05")
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


@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow])
@given(mutations.map(mutate))
def test_fast_path_accepts_exactly_what_the_full_pipeline_accepts(payload: bytes) -> None:
    assume(not is_json_object(payload))  # a flip to "{" makes it a JSON frame: another path
    fast = outcome(decode_frame, payload)
    full = outcome(lambda p: _decode_msgpack_scanned(p, Limits()), payload)
    if isinstance(full, tuple):
        assert isinstance(fast, tuple) and fast[0] == full[0], (fast, full)
    else:
        assert fast == full and isinstance(fast, Frame)

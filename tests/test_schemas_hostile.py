"""Hostile payloads: each refused with the exact reason, quickly and with little memory.

Payloads are built before measuring, so the tracemalloc peak is what decoding allocated.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    ContractError,
    Frame,
    Limits,
    decode_any,
    decode_deadletter,
    decode_frame,
    decode_results,
    decode_status,
    encode_frame,
)
from schemas.errors import ReasonCode
from tests.hostile_bytes import mutate

MiB = 1 << 20
Decoder = Callable[[bytes], object]

VALID = encode_frame(
    Frame(seq=42, ts=1766400000.125, tensor=np.arange(16, dtype=np.float32).reshape(4, 4))
)
VALID_JSON = encode_frame(Frame(seq=42, ts=1.5, tensor=np.arange(6, dtype=np.int16)), as_json=True)


def refused(decode: Decoder, payload: bytes) -> tuple[ReasonCode, int]:
    """(reason, peak bytes allocated while decoding)."""
    tracemalloc.start()
    try:
        decode(payload)
    except ContractError as exc:
        return exc.reason, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pytest.fail(f"{payload[:40]!r}... was accepted")


BOTH = pytest.mark.parametrize("decode", [decode_frame, decode_any], ids=["frame", "any"])


@BOTH
def test_deeply_nested_arrays(decode: Decoder) -> None:
    for payload in (b"\x91" * 100_000, b"\x91" * 100_000 + b"\x00"):
        reason, peak = refused(decode, payload)
        assert reason == "malformed"
        assert peak < 64 * 1024


def test_deeply_nested_unknown_field_of_a_frame() -> None:
    # Typed decoding skips unknown fields recursively in msgspec: the pre-scan must stop it.
    payload = VALID[:1].replace(b"\x86", b"\x87") + VALID[1:] + b"\xa1x" + b"\x81\xa1k" * 50_000
    payload += b"\xc0"
    reason, peak = refused(decode_frame, payload)
    assert reason == "malformed"
    assert peak < 64 * 1024


@BOTH
@pytest.mark.parametrize(
    "header",
    [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xde\xff\xff"],
    ids=["array32", "map32", "array16", "map16"],
)
def test_container_claiming_more_entries_than_bytes(decode: Decoder, header: bytes) -> None:
    for tail in (b"", b"\xc0" * 1000):
        reason, peak = refused(decode, header + tail)
        assert reason == "malformed"
        assert peak < 64 * 1024


@BOTH
@pytest.mark.parametrize(
    "header",
    [b"\xc6\x80\x00\x00\x00", b"\xdb\x80\x00\x00\x00", b"\xc9\x80\x00\x00\x00\x01"],
    ids=["bin32", "str32", "ext32"],
)
def test_value_claiming_2_gib(decode: Decoder, header: bytes) -> None:
    for tail in (b"", b"\x00" * 1000):
        reason, peak = refused(decode, header + tail)
        assert reason == "malformed"
        assert peak < 64 * 1024


def test_container_claim_is_refused_from_its_header() -> None:
    # Refused at byte 0 from the claim alone, not after walking what follows it.
    payload = b"\xdd\xff\xff\xff\xff" + b"\xc0" * (MiB - 16)
    with pytest.raises(ContractError, match="container of 4294967295 entries") as excinfo:
        decode_any(payload)
    assert excinfo.value.reason == "malformed"


def test_json_data_longer_than_its_shape_is_refused_before_building_it() -> None:
    payload = b'{"v":1,"seq":1,"dtype":"float64","shape":[2],"data":[' + b"1.5," * 200_000
    payload += b"1.5]}"
    reason, peak = refused(decode_frame, payload)
    assert reason == "bad_shape"
    assert peak < 2 * len(payload)  # 200,001 Python floats would be ~6 MiB


def test_bin32_claim_inside_a_frame() -> None:
    head = msgspec.msgpack.encode({"v": 1, "seq": 1, "dtype": "uint8", "shape": [4]})
    payload = head[:1].replace(b"\x84", b"\x85") + head[1:] + b"\xa4data\xc6\x80\x00\x00\x00"
    reason, peak = refused(decode_frame, payload + b"\x00" * 10)
    assert reason == "malformed"
    assert peak < 64 * 1024


@BOTH
def test_non_string_map_keys(decode: Decoder) -> None:
    assert refused(decode, b"\x81\x01\x02")[0] == "malformed"
    assert refused(decode, b"\x81\xc4\x01k\x02")[0] == "malformed"  # bin key
    assert refused(decode, b"\x81\x91\x01\x02")[0] == "malformed"  # array key
    frame_plus_int_key = VALID[:1].replace(b"\x86", b"\x87") + VALID[1:] + b"\x07\x08"
    assert refused(decode, frame_plus_int_key)[0] == "malformed"


@BOTH
def test_invalid_utf8(decode: Decoder) -> None:
    assert refused(decode, b"\xa2\xff\xfe")[0] == "malformed"
    assert refused(decode, b"\x81\xa2\xc3\x28\x01")[0] == "malformed"  # in a key
    in_unknown_value = VALID[:1].replace(b"\x86", b"\x87") + VALID[1:] + b"\xa1x\xa1\x80"
    assert refused(decode, in_unknown_value)[0] == "malformed"
    assert refused(decode, b'{"v":1,"x":"\xff"}')[0] == "malformed"
    assert refused(decode, b'{"v":1,"\xed\xa0\x80":1}')[0] == "malformed"  # a surrogate


@BOTH
def test_trailing_bytes(decode: Decoder) -> None:
    for tail in (b"\x00", b"\xc0", VALID):
        assert refused(decode, VALID + tail)[0] == "malformed"
    assert refused(decode, VALID_JSON + b" x")[0] == "malformed"


@BOTH
@pytest.mark.parametrize(
    "ext",
    [
        b"\xd4\x01\x00",
        b"\xd5\x01\x00\x00",
        b"\xd6\xff\x00\x00\x00\x01",  # a msgpack timestamp
        b"\xd7\x01" + b"\x00" * 8,
        b"\xd8\x01" + b"\x00" * 16,
        b"\xc7\x01\x05\x00",
        b"\xc8\x00\x01\x05\x00",
        b"\xc9\x00\x00\x00\x01\x05\x00",
    ],
    ids=["fixext1", "fixext2", "fixext4", "fixext8", "fixext16", "ext8", "ext16", "ext32"],
)
def test_ext_types(decode: Decoder, ext: bytes) -> None:
    assert refused(decode, ext)[0] == "malformed"
    as_seq = VALID.replace(b"\xa3seq*", b"\xa3seq" + ext)
    assert as_seq != VALID
    assert refused(decode, as_seq)[0] == "malformed"


@pytest.mark.parametrize("payload", [VALID, VALID_JSON], ids=["msgpack", "json"])
def test_every_truncation_of_a_valid_frame(payload: bytes) -> None:
    assert decode_frame(payload).seq == 42
    for end in range(len(payload)):
        with pytest.raises(ContractError) as excinfo:
            decode_frame(payload[:end])
        assert excinfo.value.reason == "malformed", end
        with pytest.raises(ContractError) as excinfo:
            decode_any(payload[:end])
        assert excinfo.value.reason == "malformed", end


@BOTH
def test_payload_one_byte_over_the_cap(decode: Decoder) -> None:
    for payload in (
        b"\x00" * (MiB + 1),
        b"{" + b" " * MiB,
        VALID + b"\x00" * (MiB + 1 - len(VALID)),
    ):
        assert len(payload) == MiB + 1
        reason, peak = refused(decode, payload)
        assert reason == "payload_too_large"
        assert peak < 16 * 1024


@BOTH
def test_deep_json(decode: Decoder) -> None:
    for payload in (b"[" * 100_000, b'{"v":1,"x":' + b"[" * 100_000, b'{"a":' * 100_000):
        reason, peak = refused(decode, payload)
        assert reason == "malformed"
        assert peak < MiB


@BOTH
def test_brackets_inside_strings_are_not_nesting(decode: Decoder) -> None:
    payload = VALID_JSON[:-1] + b',"note":"' + b"[{" * 1000 + b'\\"]}' + b'"}'
    assert isinstance(decode(payload), Frame | dict)


@BOTH
def test_escaped_quotes_do_not_hide_nesting(decode: Decoder) -> None:
    payload = b'{"v":1,"x":"\\"' + b"[" * 100 + b'"}'  # all inside one string: fine
    assert refused(decode_frame, payload)[0] == "bad_schema"
    payload = b'{"v":1,"x":"\\\\",' + b'"y":' + b"[" * 100 + b"1" + b"]" * 100 + b"}"
    assert refused(decode, payload)[0] == "malformed"


def test_decode_any_value_budget_bounds_amplification() -> None:
    # 1 MiB of empty arrays would be ~70 MiB of Python lists; the pre-scan refuses it.
    n = MiB - 8
    for payload in (
        b"\xdd" + struct.pack(">I", n) + b"\x90" * n,
        b"\xdd" + struct.pack(">I", n) + b"\xe0" * n,  # negative fixints, not cached ints
        b"[" + b"[]," * (n // 3 - 1) + b"[]]",
    ):
        assert len(payload) <= MiB
        reason, peak = refused(decode_any, payload)
        assert reason == "malformed"
        assert peak < 2 * MiB


@pytest.mark.parametrize(
    "decode",
    [decode_frame, decode_results, decode_status, decode_deadletter, decode_any],
    ids=["frame", "results", "status", "deadletter", "any"],
)
def test_unknown_fields_cannot_carry_unbounded_values(decode: Decoder) -> None:
    n = MiB - 16
    payload = b"\x82\xa1v\x01\xa1x\xdd" + struct.pack(">I", n) + b"\x80" * n
    reason, peak = refused(decode, payload)
    assert reason == "malformed"
    assert peak < 64 * 1024


def test_depth_and_value_caps_are_exact() -> None:
    limits = Limits(max_depth=3, max_items=5)
    assert decode_any(b"\x91\x91\x91\x01", limits) == [[[1]]]
    assert refused(lambda p: decode_any(p, limits), b"\x91\x91\x91\x91\x01")[0] == "malformed"
    assert decode_any(b"[[[1]]]", limits) == [[[1]]]
    assert refused(lambda p: decode_any(p, limits), b"[[[[1]]]]")[0] == "malformed"
    assert decode_any(b"\x94\x01\x02\x03\x04", limits) == [1, 2, 3, 4]
    assert refused(lambda p: decode_any(p, limits), b"\x95\x01\x02\x03\x04\x05")[0] == "malformed"
    assert decode_any(b"[1,2,3,4]", limits) == [1, 2, 3, 4]
    assert refused(lambda p: decode_any(p, limits), b"[1,2,3,4,5]")[0] == "malformed"


# Arbitrary bytes never escape as anything but ContractError.

mutations = st.tuples(
    st.sampled_from([VALID, VALID_JSON]),
    st.integers(0, 200),
    st.integers(0, 255),
    st.sampled_from(["flip", "insert", "delete", "truncate"]),
)


frame_like = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 2]),
        "seq": st.integers(-2, 2**64 - 1),
        "dtype": st.sampled_from(["float16", "float32", "int8", "uint8", "int64", "x"]),
        "shape": st.lists(st.integers(-1, 4), max_size=5),
    },
    optional={
        "ts": st.none() | st.floats() | st.integers(-1, 2**40),
        "data": st.binary(max_size=64)
        | st.lists(st.floats() | st.integers(-(2**63), 2**64 - 1), max_size=20),
    },
)
structured = st.one_of(
    frame_like.map(msgspec.msgpack.encode),
    frame_like.map(
        lambda d: msgspec.json.encode(
            {k: list(v) if isinstance(v, bytes) else v for k, v in d.items()}
        )
    ),
)

payloads = (
    structured
    | st.binary(max_size=256)
    | st.binary(max_size=128).map(lambda b: b"{" + b)
    | mutations.map(mutate)
    | st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text()
        | st.binary(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=20,
    ).map(msgspec.msgpack.encode)
)


def outcome(decode: Decoder, payload: bytes) -> object:
    """What ``decode`` returned, or the ContractError it raised (anything else escapes)."""
    try:
        return decode(payload)
    except ContractError as exc:
        return exc


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_decode_frame_returns_a_frame_or_raises_contract_error(payload: bytes) -> None:
    result = outcome(decode_frame, payload)
    if isinstance(result, ContractError):
        assert str(result).startswith(result.reason + ": ")
    else:
        assert isinstance(result, Frame)
        assert not result.tensor.flags.writeable


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_decode_any_returns_a_value_or_raises_contract_error(payload: bytes) -> None:
    result = outcome(decode_any, payload)
    if isinstance(result, ContractError):
        assert result.reason in ("malformed", "payload_too_large")


@settings(max_examples=500)
@given(payloads)
def test_message_decoders_raise_only_contract_error(payload: bytes) -> None:
    for decode in (decode_results, decode_status, decode_deadletter):
        result = outcome(decode, payload)
        if isinstance(result, ContractError):
            assert result.reason in ("malformed", "bad_schema", "bad_version")

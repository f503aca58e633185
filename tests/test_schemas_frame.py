"""schemas.frame: round trips in both encodings and every refusal of decode_frame."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas import DTYPES, ContractError, Frame, Limits, decode_frame, encode_frame
from schemas.errors import ReasonCode
from schemas.fields import EPOCH_MAX


def reason(payload: bytes, limits: Limits | None = None) -> ReasonCode:
    with pytest.raises(ContractError) as excinfo:
        decode_frame(payload) if limits is None else decode_frame(payload, limits)
    return excinfo.value.reason


def packed(**fields: Any) -> bytes:
    message: dict[str, Any] = {"v": 1, "seq": 7, "dtype": "float32", "shape": [2]}
    message["data"] = np.array([1.0, 2.0], dtype="<f4").tobytes()
    message.update(fields)
    return msgspec.msgpack.encode({k: v for k, v in message.items() if v is not ...})


def json_frame(**fields: Any) -> bytes:
    message: dict[str, Any] = {"v": 1, "seq": 7, "dtype": "float32", "shape": [2]}
    message["data"] = [1.0, 2.0]
    message.update(fields)
    return msgspec.json.encode({k: v for k, v in message.items() if v is not ...})


def tensors() -> st.SearchStrategy[np.ndarray]:
    shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)
    return st.sampled_from(sorted(DTYPES)).flatmap(
        lambda name: hnp.arrays(
            DTYPES[name],
            shapes,
            elements={"allow_nan": False, "allow_infinity": False}
            if DTYPES[name].kind == "f"
            else None,
        )
    )


frames = st.builds(
    Frame,
    seq=st.integers(0, 2**63 - 1),
    ts=st.none() | st.floats(0, EPOCH_MAX),
    tensor=tensors(),
)


@settings(max_examples=300)
@given(frames)
def test_msgpack_round_trip(frame: Frame) -> None:
    back = decode_frame(encode_frame(frame))
    assert back == frame
    assert back.tensor.dtype == DTYPES[back.tensor.dtype.name]
    assert not back.tensor.flags.writeable


@settings(max_examples=300)
@given(frames)
def test_json_round_trip(frame: Frame) -> None:
    # Every finite value of every dtype survives JSON: ints exactly, floats via the
    # shortest repr of the float64 that holds them exactly.
    payload = encode_frame(frame, as_json=True)
    assert payload.startswith(b"{")
    back = decode_frame(payload)
    assert back == frame
    assert not back.tensor.flags.writeable


def test_frame_equality_looks_at_values() -> None:
    a = Frame(seq=1, ts=None, tensor=np.zeros(3, dtype=np.float32))
    assert a == Frame(seq=1, ts=None, tensor=np.zeros(3, dtype=np.float32))
    assert a != Frame(seq=1, ts=None, tensor=np.ones(3, dtype=np.float32))
    assert a != Frame(seq=1, ts=None, tensor=np.zeros(3, dtype=np.float64))
    assert a != Frame(seq=2, ts=None, tensor=np.zeros(3, dtype=np.float32))
    assert a != "frame"


def test_wire_form_is_the_documented_one() -> None:
    frame = Frame(seq=42, ts=1766400000.125, tensor=np.zeros((8, 8), dtype=np.float32))
    message = msgspec.msgpack.decode(encode_frame(frame))
    assert message == {
        "v": 1,
        "seq": 42,
        "ts": 1766400000.125,
        "dtype": "float32",
        "shape": [8, 8],
        "data": bytes(256),
    }
    no_ts = msgspec.json.decode(
        encode_frame(Frame(seq=1, ts=None, tensor=frame.tensor), as_json=True)
    )
    assert "ts" not in no_ts
    assert no_ts["data"] == [0.0] * 64


def test_msgpack_tensor_is_a_view_of_the_payload() -> None:
    payload = encode_frame(Frame(seq=1, ts=None, tensor=np.arange(1024, dtype=np.float32)))
    frame = decode_frame(payload)
    assert np.shares_memory(frame.tensor, np.frombuffer(payload, dtype=np.uint8))


def test_json_from_a_simple_sensor() -> None:
    payload = b' \n {"v": 1, "seq": 42, "ts": 1766400000, "dtype": "uint8", "shape": [2, 2],\n'
    payload += b' "data": [0, 1, 254, 255]}\n'
    frame = decode_frame(payload)
    assert frame.seq == 42
    assert frame.ts == 1766400000.0
    assert frame.tensor.tolist() == [[0, 1], [254, 255]]


def test_unknown_fields_are_ignored() -> None:
    extra = {"later": {"nested": [1, 2, {"x": b"\x00"}]}, "zz": None}
    frame = decode_frame(packed(**extra))
    assert frame.tensor.tolist() == [1.0, 2.0]
    assert decode_frame(json_frame(later={"a": [1, [2]]})).seq == 7


def test_ts_is_optional_and_null_is_absent() -> None:
    assert decode_frame(packed()).ts is None
    assert decode_frame(packed(ts=None)).ts is None
    assert decode_frame(json_frame(ts=None)).ts is None
    assert decode_frame(packed(ts=5)).ts == 5.0


@pytest.mark.parametrize("encode", [packed, json_frame])
@pytest.mark.parametrize("v", [2, 0, -1, 2**64 - 1])
def test_other_versions(encode: Any, v: int) -> None:
    assert reason(encode(v=v)) == "bad_version"


@pytest.mark.parametrize("encode", [packed, json_frame])
def test_version_is_checked_before_the_rest_of_the_schema(encode: Any) -> None:
    assert reason(encode(v=2, seq="not a number", dtype=..., data=...)) == "bad_version"


@pytest.mark.parametrize("encode", [packed, json_frame])
@pytest.mark.parametrize(
    "fields",
    [
        {"v": ...},
        {"v": "1"},
        {"v": 1.0},
        {"seq": ...},
        {"seq": -1},
        {"seq": 2**63},
        {"seq": 1.5},
        {"seq": True},
        {"ts": -1.0},
        {"ts": "now"},
        {"dtype": ...},
        {"dtype": 5},
        {"shape": ...},
        {"shape": "2"},
        {"shape": [2.0]},
        {"data": ...},
        {"data": "AAAA"},
    ],
    ids=repr,
)
def test_schema_violations(encode: Any, fields: dict[str, Any]) -> None:
    assert reason(encode(**fields)) == "bad_schema"


def test_msgpack_data_must_be_bin_and_json_data_a_flat_number_list() -> None:
    assert reason(packed(data=[1.0, 2.0])) == "bad_schema"
    assert reason(packed(data="ab")) == "bad_schema"
    assert reason(json_frame(data=[[1.0], [2.0]])) == "bad_schema"
    assert reason(json_frame(data=[1.0, "2"])) == "bad_schema"
    assert reason(json_frame(data=[1.0, True])) == "bad_schema"
    assert reason(json_frame(data={"a": 1})) == "bad_schema"
    assert reason(json_frame(dtype="int32", data=[1, 2.5])) == "bad_schema"
    assert reason(json_frame(dtype="int8", data=[1, 128])) == "bad_schema"
    assert reason(json_frame(dtype="uint64", data=[1, 2])) == "bad_dtype"


@pytest.mark.parametrize("encode", [packed, json_frame])
def test_ts_must_be_finite(encode: Any) -> None:
    if encode is packed:
        assert reason(packed(ts=float("nan"))) == "bad_schema"
        assert reason(packed(ts=float("inf"))) == "bad_schema"
    else:
        assert reason(json_frame()[:-1] + b',"ts":1e999}') == "bad_schema"


def test_json_data_length_must_match_shape() -> None:
    assert reason(json_frame(shape=[3])) == "bad_shape"
    assert reason(json_frame(shape=[1])) == "bad_shape"
    assert reason(json_frame(data=[])) == "bad_shape"
    assert reason(json_frame(shape=[2], data=[1.0] * 10_000)) == "bad_shape"


@pytest.mark.parametrize("encode", [packed, json_frame])
@pytest.mark.parametrize("shape", [[0], [2, 0], [-2], [], [1, 1, 1, 1, 2]], ids=repr)
def test_bad_shape(encode: Any, shape: list[int]) -> None:
    assert reason(encode(shape=shape)) == "bad_shape"


@pytest.mark.parametrize("encode", [packed, json_frame])
def test_too_many_elements(encode: Any) -> None:
    assert reason(encode(shape=[512, 513])) == "too_many_elements"
    assert reason(encode(shape=[2**64 - 1] * 4)) == "too_many_elements"
    assert reason(encode(shape=[4, 4]), Limits(max_tensor_elements=15)) == "too_many_elements"


@pytest.mark.parametrize("encode", [packed, json_frame])
@pytest.mark.parametrize("dtype", ["complex64", "float128", "", "f4"])
def test_unknown_dtype(encode: Any, dtype: str) -> None:
    assert reason(encode(dtype=dtype)) == "bad_dtype"


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_msgpack_data(dtype: str, value: float) -> None:
    data = np.array([0.5, value], dtype=DTYPES[dtype]).tobytes()
    assert reason(packed(dtype=dtype, data=data)) == "non_finite"


@pytest.mark.parametrize(
    ("dtype", "number"),
    [
        ("float64", b"1e999"),
        ("float64", b"-1e999"),
        ("float32", b"1e999"),
        ("float32", b"3.5e38"),
        ("float16", b"70000"),
        ("float16", b"-1e999"),
    ],
)
def test_non_finite_json_data(dtype: str, number: bytes) -> None:
    # Beyond float64 (msgspec refuses to parse it) or beyond the dtype: infinite either way.
    payload = json_frame(dtype=dtype).replace(b"[1.0,2.0]", b"[1.0," + number + b"]")
    assert reason(payload) == "non_finite"


def test_json_numbers_within_range_are_kept() -> None:
    payload = json_frame(dtype="float32").replace(b"[1.0,2.0]", b"[70000,-3.0e38]")
    assert decode_frame(payload).tensor.tolist() == [70000.0, np.float32(-3.0e38).item()]


def test_payload_cap_boundary() -> None:
    payload = packed()
    assert decode_frame(payload, Limits(max_payload_bytes=len(payload))).seq == 7
    assert reason(payload, Limits(max_payload_bytes=len(payload) - 1)) == "payload_too_large"


def test_encode_refuses_what_decode_refuses() -> None:
    ok = np.zeros(2, dtype=np.float32)
    cases: list[tuple[Frame, ReasonCode]] = [
        (Frame(seq=1, ts=None, tensor=ok, v=2), "bad_version"),
        (Frame(seq=-1, ts=None, tensor=ok), "bad_schema"),
        (Frame(seq=2**63, ts=None, tensor=ok), "bad_schema"),
        (Frame(seq=1, ts=float("nan"), tensor=ok), "bad_schema"),
        (Frame(seq=1, ts=-5.0, tensor=ok), "bad_schema"),
        (Frame(seq=1, ts=None, tensor=np.array([np.nan], dtype=np.float32)), "non_finite"),
        (Frame(seq=1, ts=None, tensor=np.zeros(2, dtype=bool)), "bad_dtype"),
        (Frame(seq=1, ts=None, tensor=np.array(1.0, dtype=np.float32)), "bad_shape"),
    ]
    for frame, expected in cases:
        for as_json in (False, True):
            with pytest.raises(ContractError) as excinfo:
                encode_frame(frame, as_json=as_json)
            assert excinfo.value.reason == expected

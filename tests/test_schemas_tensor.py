"""schemas.tensor: dtype/shape/data checks in contract order, and the wire form."""

from __future__ import annotations

import numpy as np
import pytest

from schemas import DTYPES, ContractError, Limits, tensor_from_wire, tensor_to_wire
from schemas.errors import ReasonCode

LIMITS = Limits()


def reason_of(excinfo: pytest.ExceptionInfo[ContractError]) -> ReasonCode:
    return excinfo.value.reason


def test_dtypes_are_the_eight_little_endian_ones() -> None:
    assert set(DTYPES) == {
        "float32",
        "float16",
        "float64",
        "int8",
        "uint8",
        "int16",
        "int32",
        "int64",
    }
    for name, dt in DTYPES.items():
        assert dt.name == name
        assert dt.byteorder in ("<", "|") or (dt.byteorder == "=" and np.little_endian)
        assert dt.newbyteorder("<") == dt


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_bytes_round_trip_every_dtype(name: str) -> None:
    arr = (np.arange(24) % 7).astype(DTYPES[name]).reshape(2, 3, 4)
    dtype, shape, data = tensor_to_wire(arr)
    assert (dtype, shape) == (name, [2, 3, 4])
    assert data == arr.astype(DTYPES[name].newbyteorder("<")).tobytes()
    back = tensor_from_wire(dtype, shape, data, LIMITS)
    assert back.dtype == DTYPES[name]
    assert np.array_equal(back, arr)
    assert not back.flags.writeable


def test_bytes_are_viewed_not_copied() -> None:
    data = np.arange(16, dtype="<f4").tobytes()
    view = memoryview(data)
    arr = tensor_from_wire("float32", [4, 4], view, LIMITS)
    assert np.shares_memory(arr, np.frombuffer(data, dtype=np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        arr[0, 0] = 1.0


def test_writable_buffer_still_gives_read_only_array() -> None:
    arr = tensor_from_wire("uint8", [3], bytearray(b"abc"), LIMITS)
    assert not arr.flags.writeable
    assert arr.tolist() == [97, 98, 99]


def test_list_data_builds_read_only_array() -> None:
    arr = tensor_from_wire("int16", [2, 2], [1, -2, 3, -4], LIMITS)
    assert arr.dtype == np.dtype("<i2")
    assert arr.tolist() == [[1, -2], [3, -4]]
    assert not arr.flags.writeable
    floats = tensor_from_wire("float16", [3], [0.5, 1, -2.25], LIMITS)
    assert floats.tolist() == [0.5, 1.0, -2.25]


def test_big_endian_input_is_sent_little_endian() -> None:
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    dtype, shape, data = tensor_to_wire(arr)
    assert (dtype, shape) == ("int32", [2, 3])
    assert data == np.arange(6, dtype="<i4").tobytes()


def test_non_contiguous_input_is_sent_in_c_order() -> None:
    arr = np.arange(12, dtype=np.float64).reshape(3, 4).T
    dtype, shape, data = tensor_to_wire(arr)
    assert shape == [4, 3]
    assert np.array_equal(tensor_from_wire(dtype, shape, data, LIMITS), arr)


@pytest.mark.parametrize("dtype", ["complex64", "float8", "", "FLOAT32", "bool", "object"])
def test_unknown_dtype(dtype: str) -> None:
    with pytest.raises(ContractError) as excinfo:
        tensor_from_wire(dtype, [1], b"\x00" * 8, LIMITS)
    assert reason_of(excinfo) == "bad_dtype"


@pytest.mark.parametrize(
    "shape", [[], [0], [2, 0], [-1], [3, -2], [1, 1, 1, 1, 1], [True], [1.0]], ids=repr
)
def test_bad_shapes(shape: list[int]) -> None:
    with pytest.raises(ContractError) as excinfo:
        tensor_from_wire("uint8", shape, b"\x00", LIMITS)
    assert reason_of(excinfo) == "bad_shape"


def test_rank_cap_follows_limits() -> None:
    assert tensor_from_wire("uint8", [1] * 6, b"\x07", Limits(max_rank=6)).shape == (1,) * 6
    with pytest.raises(ContractError) as excinfo:
        tensor_from_wire("uint8", [1] * 7, b"\x07", Limits(max_rank=6))
    assert reason_of(excinfo) == "bad_shape"


def test_element_cap_is_checked_before_data() -> None:
    # Data is absent/wrong on purpose: the count must be refused without looking at it.
    for shape in ([512, 513], [2**64 - 1, 2**64 - 1], [262_145]):
        with pytest.raises(ContractError) as excinfo:
            tensor_from_wire("float32", shape, b"", LIMITS)
        assert reason_of(excinfo) == "too_many_elements"
    ok = tensor_from_wire("uint8", [512, 512], bytes(262_144), LIMITS)
    assert ok.size == 262_144


@pytest.mark.parametrize("nbytes", [0, 15, 17, 32])
def test_byte_length_must_match_shape(nbytes: int) -> None:
    with pytest.raises(ContractError) as excinfo:
        tensor_from_wire("float32", [2, 2], b"\x00" * nbytes, LIMITS)
    assert reason_of(excinfo) == "bad_shape"


@pytest.mark.parametrize("values", [[1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
def test_list_length_must_match_shape(values: list[float]) -> None:
    with pytest.raises(ContractError) as excinfo:
        tensor_from_wire("float32", [2, 2], values, LIMITS)
    assert reason_of(excinfo) == "bad_shape"


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_bytes(dtype: str, bad: float) -> None:
    data = np.array([1.0, bad], dtype=DTYPES[dtype]).tobytes()
    with pytest.raises(ContractError) as excinfo:
        tensor_from_wire(dtype, [2], data, LIMITS)
    assert reason_of(excinfo) == "non_finite"


@pytest.mark.parametrize("values", [[1e39], [-1e39], [10**400], [float("nan")]], ids=repr)
def test_non_finite_after_conversion_to_float32(values: list[float]) -> None:
    with pytest.raises(ContractError) as excinfo:
        tensor_from_wire("float32", [1], values, LIMITS)
    assert reason_of(excinfo) == "non_finite"


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        ("int8", [128]),
        ("int8", [-129]),
        ("uint8", [-1]),
        ("int64", [2**63]),
        ("int32", [1.0]),
        ("int32", [True]),
        ("float32", ["1"]),
        ("float32", [None]),
        ("float32", [[1.0]]),
    ],
    ids=repr,
)
def test_list_values_must_fit_dtype(dtype: str, values: list[object]) -> None:
    with pytest.raises(ContractError) as excinfo:
        tensor_from_wire(dtype, [1], values, LIMITS)  # type: ignore[arg-type]
    assert reason_of(excinfo) == "bad_schema"


def test_to_wire_refuses_what_decoders_refuse() -> None:
    cases: list[tuple[np.ndarray, ReasonCode]] = [
        (np.zeros(3, dtype=bool), "bad_dtype"),
        (np.zeros(3, dtype=np.complex64), "bad_dtype"),
        (np.zeros(3, dtype=np.uint16), "bad_dtype"),
        (np.array(1.0, dtype=np.float32), "bad_shape"),
        (np.zeros((2, 0), dtype=np.float32), "bad_shape"),
        (np.array([1.0, np.nan], dtype=np.float32), "non_finite"),
        (np.array([np.inf], dtype=np.float16), "non_finite"),
    ]
    for arr, reason in cases:
        with pytest.raises(ContractError) as excinfo:
            tensor_to_wire(arr)
        assert reason_of(excinfo) == reason, arr

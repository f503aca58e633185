"""Tensors on the wire: ``dtype`` name, ``shape``, and data as raw little-endian bytes
(MessagePack ``bin``) or a flat list of numbers (JSON).

Bytes are viewed, never copied: ``np.frombuffer`` over the decoder's zero-copy
``memoryview`` of the payload, so the array keeps the payload alive and may be unaligned.
Every array handed out is read-only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

import numpy as np

from .errors import ContractError
from .limits import Limits

DTYPES: Final[Mapping[str, np.dtype[Any]]] = MappingProxyType(
    {
        "float32": np.dtype("<f4"),
        "float16": np.dtype("<f2"),
        "float64": np.dtype("<f8"),
        "int8": np.dtype("i1"),
        "uint8": np.dtype("u1"),
        "int16": np.dtype("<i2"),
        "int32": np.dtype("<i4"),
        "int64": np.dtype("<i8"),
    }
)

_NAMES: Final[Mapping[np.dtype[Any], str]] = MappingProxyType(
    {dt: name for name, dt in DTYPES.items()}
)

Numbers = list[float] | list[int] | list[float | int]


def check_header(
    dtype: str, shape: Sequence[int], limits: Limits
) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    """Validate dtype and shape without looking at any data.

    Returns (numpy dtype, dims, element count). Raises ``bad_dtype``, ``bad_shape`` or
    ``too_many_elements``.
    """
    dt = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if dt is None:
        raise ContractError("bad_dtype", f"unknown dtype {str(dtype)[:32]!r}; known: {_known()}")
    if not 1 <= len(shape) <= limits.max_rank:
        raise ContractError("bad_shape", f"rank {len(shape)} not in 1..{limits.max_rank}")
    count = 1
    dims: list[int] = []
    for dim in shape:
        if not isinstance(dim, int | np.integer) or isinstance(dim, bool) or dim < 1:
            raise ContractError("bad_shape", f"every dim must be an int >= 1, got {list(shape)}")
        dims.append(int(dim))
        count *= int(dim)
        if count > limits.max_tensor_elements:
            raise ContractError(
                "too_many_elements",
                f"shape {list(shape)} exceeds {limits.max_tensor_elements} elements",
            )
    return dt, tuple(dims), count


def tensor_from_wire(
    dtype: str,
    shape: Sequence[int],
    data: bytes | bytearray | memoryview | Numbers,
    limits: Limits,
) -> np.ndarray:
    """Build the read-only array a wire tensor describes, checking it fully.

    Checks, in order: dtype known (``bad_dtype``); rank in 1..max_rank and every dim >= 1
    (``bad_shape``); element count (``too_many_elements``), all before touching ``data``;
    then data length (``bad_shape``), list element types and integer ranges
    (``bad_schema``) and, for float dtypes, that every value is finite (``non_finite``).
    """
    dt, dims, count = check_header(dtype, shape, limits)
    if isinstance(data, list):
        return array_from_values(dt, dims, count, data, typed=False)
    if isinstance(data, bytes | bytearray | memoryview):
        return array_from_buffer(dt, dims, count, data)
    raise TypeError(f"tensor data must be bytes-like or a list, not {type(data).__name__}")


def array_from_buffer(
    dt: np.dtype[Any], dims: tuple[int, ...], count: int, data: bytes | bytearray | memoryview
) -> np.ndarray:
    """The zero-copy path: view ``data`` (already checked header) as the tensor."""
    view = memoryview(data)
    if not view.c_contiguous:
        raise ContractError("bad_shape", "tensor data buffer is not contiguous")
    expected = count * dt.itemsize
    if view.nbytes != expected:
        raise ContractError(
            "bad_shape",
            f"data is {view.nbytes} bytes, shape {list(dims)} of {dt.name} needs {expected}",
        )
    array = np.frombuffer(view, dtype=dt).reshape(dims)
    return _finish(array)


def array_from_values(
    dt: np.dtype[Any], dims: tuple[int, ...], count: int, values: Numbers, *, typed: bool
) -> np.ndarray:
    """Build the tensor from a flat list of numbers (one copy).

    ``typed=True`` promises every element already is an ``int`` (int dtypes) or a ``float``
    or ``int`` (float dtypes), as a typed msgspec decode guarantees; otherwise each element
    is checked.
    """
    if len(values) != count:
        raise ContractError(
            "bad_shape", f"data has {len(values)} values, shape {list(dims)} needs {count}"
        )
    if dt.kind == "f":
        if not typed and not all(_is_number(x) for x in values):
            raise ContractError("bad_schema", f"{dt.name} data must be numbers")
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                array = np.array(values, dtype=dt)
        except OverflowError:  # an int too large for any float
            raise ContractError(
                "non_finite", f"{dt.name} data holds a value out of range"
            ) from None
    else:
        if not typed and not all(type(x) is int for x in values):
            raise ContractError("bad_schema", f"{dt.name} data must be integers")
        ints: list[int] = values  # type: ignore[assignment]
        info = np.iinfo(dt)
        if min(ints) < info.min or max(ints) > info.max:
            raise ContractError(
                "bad_schema", f"{dt.name} data holds a value outside {info.min}..{info.max}"
            )
        array = np.array(ints, dtype=dt)
    return _finish(array.reshape(dims))


def tensor_to_wire(arr: np.ndarray) -> tuple[str, list[int], bytes]:
    """(dtype name, shape, little-endian bytes) of ``arr``; refuses what decoders refuse
    regardless of limits: unknown dtype, rank 0 or an empty dim, non-finite floats."""
    name, shape, contiguous = wire_parts(arr)
    return name, shape, contiguous.tobytes()


def wire_parts(arr: np.ndarray) -> tuple[str, list[int], np.ndarray]:
    """Like :func:`tensor_to_wire` but returns a C-contiguous little-endian array (no copy
    if ``arr`` already is one) instead of bytes, for encoders that can take a buffer."""
    name = _NAMES.get(arr.dtype.newbyteorder("<"))
    if name is None:
        raise ContractError("bad_dtype", f"dtype {arr.dtype} is not one of {_known()}")
    if arr.ndim < 1 or 0 in arr.shape:
        raise ContractError("bad_shape", f"shape {list(arr.shape)} needs rank >= 1, dims >= 1")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ContractError("non_finite", f"{name} tensor holds NaN or infinity")
    contiguous = np.ascontiguousarray(arr, dtype=DTYPES[name])
    return name, [int(d) for d in arr.shape], contiguous


def _finish(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ContractError("non_finite", f"{array.dtype.name} data holds NaN or infinity")
    array.flags.writeable = False
    return array


def _is_number(x: object) -> bool:
    return type(x) is float or type(x) is int


def _known() -> str:
    return ", ".join(DTYPES)

"""Sensor frames: one tensor plus the sensor's own counter and clock.

MessagePack (``data`` is ``bin``, viewed zero-copy)::

    {"v": 1, "seq": 42, "ts": 1766400000.125, "dtype": "float32", "shape": [8, 8], "data": <bin>}

or JSON, recognised by a first non-whitespace byte ``{`` (``data`` a flat list of numbers).
``ts`` is optional; device and sensor come from the topic, not the payload.

A MessagePack frame that is exactly what :func:`encode_frame` writes (keys in that order, ``ts``
left out when absent, the smallest headers) is decoded by a closed schema without the generic
pre-scan; anything else takes the full pipeline (docs/adr/0066-canonical-frames.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Final, Protocol

import msgspec
import numpy as np
from msgspec import Meta

from .errors import ContractError
from .fields import EPOCH_MAX, SEQ_MAX, Epoch, Seq
from .limits import DEFAULT_LIMITS, Limits
from .tensor import array_from_values, check_header, tensor_from_wire, wire_parts
from .wire import (
    VERSION,
    check_size,
    decode_json,
    decode_msgpack,
    decode_msgpack_canonical,
    is_json_object,
    run_decoder,
)


@dataclass(frozen=True, slots=True)
class Frame:
    seq: int
    """The sensor's own frame counter (0..2**63-1)."""
    ts: float | None
    """Sensor timestamp, seconds since the epoch, if the sensor has a clock."""
    tensor: np.ndarray
    v: int = 1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (
            (self.seq, self.ts, self.v) == (other.seq, other.ts, other.v)
            and self.tensor.dtype == other.tensor.dtype
            and self.tensor.shape == other.tensor.shape
            and bool(np.array_equal(self.tensor, other.tensor))
        )


class _MsgpackFrame(msgspec.Struct):
    v: int
    seq: Seq
    dtype: str
    shape: list[int]
    data: memoryview
    ts: Epoch | None = None


class _JsonFrame(msgspec.Struct):
    v: int
    seq: Seq
    dtype: str
    shape: list[int]
    data: msgspec.Raw
    ts: Epoch | None = None


RANK_MAX: Final = 32
"""The most dims the closed (canonical) schema reads; ``limits.max_rank`` still applies."""
DTYPE_MAX_LEN: Final = 16


class _CanonicalFrame(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Closed: no unknown key is read, one level of nesting (``shape``), every length capped.
    Fields in the order :func:`encode_frame` writes them, so re-encoding gives the same bytes."""

    v: int
    seq: Seq
    ts: Epoch | None = None
    dtype: Annotated[str, Meta(max_length=DTYPE_MAX_LEN)]
    shape: Annotated[list[int], Meta(max_length=RANK_MAX)]
    data: memoryview


SCHEMA_DEPTH: Final = 2
"""Containers the closed schema nests: the frame's map, its ``shape``."""

_MSGPACK: Final = msgspec.msgpack.Decoder(_MsgpackFrame)
_CANONICAL: Final = msgspec.msgpack.Decoder(_CanonicalFrame)
_JSON: Final = msgspec.json.Decoder(_JsonFrame)
_JSON_FLOATS: Final = msgspec.json.Decoder(list[float])
_JSON_INTS: Final = msgspec.json.Decoder(list[int])
_JSON_ANY: Final = msgspec.json.Decoder(float_hook=float)  # 1e999 -> inf, to report it
_COMMA: Final = ord(",")
_FIELDS: Final = 6


def decode_frame(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Decode and fully validate one frame, MessagePack or JSON (auto-detected).

    Raises :class:`~schemas.errors.ContractError` and nothing else for any payload.
    """
    payload = check_size(payload, limits)
    if is_json_object(payload):
        return _decode_json(payload, limits)
    return _decode_msgpack(payload, limits)


def _header_values(limits: Limits) -> int:
    """Values a frame needs besides its data: the map, keys and values, shape entries."""
    return 1 + 2 * _FIELDS + limits.max_rank


def _decode_msgpack(payload: bytes, limits: Limits) -> Frame:
    def scanned(raw: bytes) -> _MsgpackFrame | _CanonicalFrame:
        return _scanned(raw, limits)

    wire = decode_msgpack_canonical(
        payload, _CANONICAL.decode, scanned, limits=limits, depth=SCHEMA_DEPTH
    )
    return _frame_of(wire, limits)


def _decode_msgpack_scanned(payload: bytes, limits: Limits) -> Frame:
    """The full pipeline alone (pre-scan, version, tolerant decode): what the fast path must
    agree with."""
    return _frame_of(_scanned(payload, limits), limits)


def _scanned(payload: bytes, limits: Limits) -> _MsgpackFrame:
    budget = _header_values(limits) + limits.max_extra_items
    return decode_msgpack(payload, _MSGPACK.decode, what="frame", limits=limits, budget=budget)


def _frame_of(wire: _MsgpackFrame | _CanonicalFrame, limits: Limits) -> Frame:
    tensor = tensor_from_wire(wire.dtype, wire.shape, wire.data, limits)
    return Frame(seq=wire.seq, ts=wire.ts, tensor=tensor, v=wire.v)


def _decode_json(payload: bytes, limits: Limits) -> Frame:
    budget = _header_values(limits) + limits.max_tensor_elements + limits.max_extra_items
    wire = decode_json(payload, _JSON.decode, what="frame", limits=limits, budget=budget)
    return Frame(seq=wire.seq, ts=wire.ts, tensor=_json_tensor(wire, limits), v=wire.v)


class _JsonTensor(Protocol):
    dtype: str
    shape: list[int]
    data: msgspec.Raw


def _json_tensor(wire: _JsonTensor, limits: Limits) -> np.ndarray:
    """The tensor of a decoded JSON frame (``data`` still raw), fully checked."""
    dt, dims, count = check_header(wire.dtype, wire.shape, limits)
    return json_data_tensor(wire.data, dt, dims, count)


def json_data_tensor(
    data: msgspec.Raw, dt: np.dtype[Any], dims: tuple[int, ...], count: int
) -> np.ndarray:
    """The tensor a JSON ``data`` list holds, for a header already checked."""
    # Refuse more values than the shape needs before building any of them.
    commas = int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8) == _COMMA))
    if commas >= count:
        raise ContractError("bad_shape", f"data has more than the {count} values shape needs")
    values: Any
    try:
        values = (_JSON_FLOATS if dt.kind == "f" else _JSON_INTS).decode(data)
        typed = True
    except msgspec.ValidationError:
        # Rare path: decode untyped to say why (a number beyond float range is non_finite).
        values = run_decoder(_JSON_ANY.decode, data, "frame data")
        typed = False
        if not isinstance(values, list):
            raise ContractError("bad_schema", "frame data must be a flat list of numbers") from None
    return array_from_values(dt, dims, count, values, typed=typed)


def encode_frame(frame: Frame, *, as_json: bool = False) -> bytes:
    """Encode a frame as MessagePack (default) or JSON.

    Refuses (:class:`~schemas.errors.ContractError`) what no decoder would accept: a ``v``
    other than 1, ``seq`` outside 0..2**63-1, a negative or non-finite ``ts``, and tensors
    :func:`~schemas.tensor.tensor_to_wire` refuses.
    """
    message = wire_message(frame, as_json=as_json)
    return msgspec.json.encode(message) if as_json else msgspec.msgpack.encode(message)


def wire_message(frame: Frame, *, as_json: bool = False) -> dict[str, object]:
    """The map :func:`encode_frame` encodes (``data`` a buffer, or a list for JSON), after its
    checks; keys in the canonical order."""
    if frame.v != VERSION:
        raise ContractError("bad_version", f"can only encode v={VERSION}, frame has v={frame.v}")
    if not isinstance(frame.seq, int | np.integer) or not 0 <= frame.seq <= SEQ_MAX:
        raise ContractError("bad_schema", f"seq {frame.seq!r} not in 0..2**63-1")
    if frame.ts is not None and not (math.isfinite(frame.ts) and 0 <= frame.ts <= EPOCH_MAX):
        raise ContractError("bad_schema", f"ts {frame.ts!r} not a time in 0..{EPOCH_MAX:.0f}")
    name, shape, array = wire_parts(frame.tensor)
    message: dict[str, object] = {"v": VERSION, "seq": int(frame.seq)}
    if frame.ts is not None:
        message["ts"] = float(frame.ts)
    message["dtype"] = name
    message["shape"] = shape
    if as_json:
        message["data"] = array.reshape(-1).tolist()
    else:
        message["data"] = array.reshape(-1).view(np.uint8).data
    return message

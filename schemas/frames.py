"""Frame batches: several frames of one sensor in one message.

A sensor that makes frames faster than one MQTT message each can afford (per message, paho and
the broker cost more than a small model's inference) may send them together::

    {"v": 1, "frames": [{"seq": 42, "ts": 1766400000.125, "dtype": "float32", "shape": [8, 8],
                         "data": <bin>}, ...]}

Each entry is a frame without ``v``; the node answers each with its own result, as if it had
come alone. :func:`decode_frames` takes either form, so a node needs one decoder per message.

Caps, on top of a single frame's: at most ``limits.max_frames_per_message`` entries, and at most
``limits.max_tensor_elements`` tensor elements in all (a batch costs the node no more than the
largest single frame would). A message that decodes as a single frame is one, with exactly the
results (and refusals) of :func:`~schemas.frame.decode_frame`; the batch form is tried only when
the single form fails and the message has a ``frames`` key. Batches exactly as
:func:`encode_frames` writes them skip the generic pre-scan (docs/adr/0066-canonical-frames.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Final, Protocol, TypeVar

import msgspec
import numpy as np
from msgspec import Meta

from .errors import ContractError
from .fields import Epoch, Seq
from .frame import _CANONICAL as _CANONICAL_SINGLE
from .frame import (
    DTYPE_MAX_LEN,
    RANK_MAX,
    SCHEMA_DEPTH,
    Frame,
    _CanonicalFrame,
    _decode_json,
    _decode_msgpack_scanned,
    _header_values,
    json_data_tensor,
    wire_message,
)
from .limits import DEFAULT_LIMITS, Limits
from .tensor import array_from_buffer, check_header, tensor_from_wire
from .wire import VERSION, check_size, decode_json, decode_msgpack, is_json_object, run_decoder

FRAMES_MAX: Final = 1024
"""The most entries the closed (canonical) batch schema reads; the limit still applies."""
BATCH_SCHEMA_DEPTH: Final = 4
"""Containers a batch nests: the message, ``frames``, a frame, its ``shape``."""


class _CanonicalEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    seq: Seq
    ts: Epoch | None = None
    dtype: Annotated[str, Meta(max_length=DTYPE_MAX_LEN)]
    shape: Annotated[list[int], Meta(max_length=RANK_MAX)]
    data: memoryview


class _CanonicalBatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    v: int
    frames: Annotated[list[_CanonicalEntry], Meta(max_length=FRAMES_MAX)]


class _Entry(msgspec.Struct):
    seq: Seq
    dtype: str
    shape: list[int]
    data: memoryview
    ts: Epoch | None = None


class _Batch(msgspec.Struct):
    v: int
    frames: list[_Entry]


class _JsonEntry(msgspec.Struct):
    seq: Seq
    dtype: str
    shape: list[int]
    data: msgspec.Raw
    ts: Epoch | None = None


class _JsonBatch(msgspec.Struct):
    v: int
    frames: list[_JsonEntry]


class _HasFrames(msgspec.Struct):
    frames: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)  # empty: no such key


class _EntryLike(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def ts(self) -> float | None: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...


E = TypeVar("E", bound=_EntryLike)

_CANONICAL_BATCH: Final = msgspec.msgpack.Decoder(_CanonicalBatch)
_MSGPACK_BATCH: Final = msgspec.msgpack.Decoder(_Batch)
_JSON_BATCH: Final = msgspec.json.Decoder(_JsonBatch)
_MSGPACK_HAS_FRAMES: Final = msgspec.msgpack.Decoder(_HasFrames)
_JSON_HAS_FRAMES: Final = msgspec.json.Decoder(_HasFrames)
_ENCODER: Final = msgspec.msgpack.Encoder()
_CLOSED_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def decode_frames(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> list[Frame]:
    """Decode one message holding a frame or a batch of frames, MessagePack or JSON.

    Raises :class:`~schemas.errors.ContractError` and nothing else for any payload; a message
    that is neither form gets the single frame's reason.
    """
    payload = check_size(payload, limits)
    if is_json_object(payload):
        try:
            return [_decode_json(payload, limits)]
        except ContractError as single:
            return _json_batch(payload, limits, single)
    if limits.max_depth >= SCHEMA_DEPTH:
        closed = _closed(_CANONICAL_SINGLE, payload)
        if isinstance(closed, _CanonicalFrame):
            return [_frame(closed, limits)]
    if limits.max_depth >= BATCH_SCHEMA_DEPTH:
        batch = _closed(_CANONICAL_BATCH, payload)
        # Over the limit: the full pipeline says why, as for any other encoding.
        if (
            isinstance(batch, _CanonicalBatch)
            and len(batch.frames) <= limits.max_frames_per_message
        ):
            return _frames(batch.frames, limits, _buffer_tensor)
    try:
        return [_decode_msgpack_scanned(payload, limits)]
    except ContractError as single:
        return _msgpack_batch(payload, limits, single)


def encode_frames(frames: Sequence[Frame], *, as_json: bool = False) -> bytes:
    """Encode frames as one batch message (what :func:`decode_frames` takes); refuses what
    :func:`~schemas.frame.encode_frame` refuses, and an empty batch."""
    if not frames:
        raise ContractError("bad_schema", "a batch needs at least one frame")
    entries = []
    for frame in frames:
        entry = wire_message(frame, as_json=as_json)
        del entry["v"]
        entries.append(entry)
    message = {"v": VERSION, "frames": entries}
    return msgspec.json.encode(message) if as_json else _ENCODER.encode(message)


def _closed(
    decoder: msgspec.msgpack.Decoder[_CanonicalFrame] | msgspec.msgpack.Decoder[_CanonicalBatch],
    payload: bytes,
) -> _CanonicalFrame | _CanonicalBatch | None:
    """The closed decode, if ``payload`` is exactly its canonical encoding (ADR 0066)."""
    try:
        message = decoder.decode(payload)
    except _CLOSED_ERRORS:
        return None
    if message.v == VERSION and _ENCODER.encode(message) == payload:
        return message
    return None


def _batch_budget(limits: Limits, per_frame: int) -> int:
    return 6 + limits.max_frames_per_message * per_frame + limits.max_extra_items


def _msgpack_batch(payload: bytes, limits: Limits, single: ContractError) -> list[Frame]:
    """The full pipeline for a MessagePack batch; ``single``, the single form's refusal, is
    raised if the payload is no batch either."""
    budget = _batch_budget(limits, _header_values(limits) - 2)  # an entry has no "v"
    if not _has_frames(decode_msgpack, _MSGPACK_HAS_FRAMES.decode, payload, limits, budget):
        raise single
    batch = run_decoder(_MSGPACK_BATCH.decode, payload, "frame batch")
    return _frames(batch.frames, limits, _buffer_tensor)


def _json_batch(payload: bytes, limits: Limits, single: ContractError) -> list[Frame]:
    """As :func:`_msgpack_batch`, for JSON (``data`` lists count as values)."""
    budget = _batch_budget(limits, _header_values(limits) - 2) + limits.max_tensor_elements
    if not _has_frames(decode_json, _JSON_HAS_FRAMES.decode, payload, limits, budget):
        raise single
    batch = run_decoder(_JSON_BATCH.decode, payload, "frame batch")
    return _frames(batch.frames, limits, lambda e, h: json_data_tensor(e.data, *h))


def _has_frames(
    pipeline: Callable[..., _HasFrames],
    decode: Callable[[bytes], _HasFrames],
    payload: bytes,
    limits: Limits,
    budget: int,
) -> bool:
    """Pre-scanned with the batch budget, version-checked: does the payload have ``frames``?
    (False when it fails those checks too: the single form's refusal then stands.)"""
    try:
        has = pipeline(payload, decode, what="frames", limits=limits, budget=budget)
    except ContractError:
        return False
    return bool(has.frames)


Header = tuple[np.dtype[Any], tuple[int, ...], int]
"""What :func:`~schemas.tensor.check_header` returns: dtype, dims, element count."""


def _frames(
    entries: Sequence[E], limits: Limits, tensor: Callable[[E, Header], np.ndarray]
) -> list[Frame]:
    """Every entry's frame, checking the count and each header (with the running element
    total) before that entry's data is touched; ``tensor`` builds it from the checked header."""
    _check_count(len(entries), limits)
    total = 0
    out: list[Frame] = []
    for i, entry in enumerate(entries):
        header = _header(entry.dtype, entry.shape, limits, i)
        total = _add_elements(total, header[2], limits)
        out.append(Frame(seq=entry.seq, ts=entry.ts, tensor=tensor(entry, header), v=VERSION))
    return out


def _buffer_tensor(entry: _Entry | _CanonicalEntry, header: Header) -> np.ndarray:
    return array_from_buffer(*header, entry.data)


def _frame(entry: _CanonicalFrame, limits: Limits) -> Frame:
    tensor = tensor_from_wire(entry.dtype, entry.shape, entry.data, limits)
    return Frame(seq=entry.seq, ts=entry.ts, tensor=tensor, v=entry.v)


def _check_count(n: int, limits: Limits) -> None:
    if not 1 <= n <= limits.max_frames_per_message:
        raise ContractError(
            "bad_schema", f"a batch holds 1..{limits.max_frames_per_message} frames, not {n}"
        )


def _header(
    dtype: str, shape: list[int], limits: Limits, i: int
) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    try:
        return check_header(dtype, shape, limits)
    except ContractError as exc:
        raise ContractError(exc.reason, f"frame {i}: {exc.detail}") from None


def _add_elements(total: int, count: int, limits: Limits) -> int:
    total += count
    if total > limits.max_tensor_elements:
        raise ContractError(
            "too_many_elements",
            f"the batch's tensors hold more than {limits.max_tensor_elements} elements in all",
        )
    return total

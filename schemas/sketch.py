"""The wire layout of a latency quantile sketch (DDSketch-style, logarithmic bins).

A value ``x > 0`` falls in bin ``key = ceil(log(x) / log(gamma))``; a bin stands for the
values in ``(gamma**(key-1), gamma**key]`` and is read back as ``2 * gamma**key / (1 + gamma)``,
within ``(gamma - 1) / (gamma + 1)`` of every value in it (1 % for ``gamma = 1.0202...``).
``counts[i]`` is the number of values in bin ``offset + i``; ``zeros`` counts values too small
for any bin. Two sketches with the same ``gamma`` merge by adding counts bin by bin.

Pure, like the rest of :mod:`schemas`: :func:`decode_sketch` checks the layout (size, depth,
types, ranges, totals); what a program does with a valid sketch is up to it (see the
``telemetry`` package).
"""

from __future__ import annotations

import sys
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from .errors import ContractError
from .fields import SEQ_MAX, Seq
from .limits import DEFAULT_LIMITS, Limits
from .wire import check_size, decode_msgpack

SKETCH_BINS_MAX: Final = 2048
"""Most bins a sketch may carry (a 1 % sketch spans 1 us .. 1 h in ~1100 bins)."""
SKETCH_MAX_BYTES: Final = 32_768
"""Largest encoded sketch accepted (2048 bins of 9-byte counts fit with room to spare)."""
SKETCH_KEY_MAX: Final = 1 << 20
"""Bound on bin keys; a 1 % sketch needs |key| < 36,000 for every positive float."""
SKETCH_COUNT_MAX: Final = 2**53
"""Total count bound: counts stay exact as floats."""

Key = Annotated[int, Meta(ge=-SKETCH_KEY_MAX, le=SKETCH_KEY_MAX)]
Gamma = Annotated[float, Meta(gt=1.0, le=2.0)]
NonNegative = Annotated[float, Meta(ge=0.0, le=sys.float_info.max)]


class SketchWire(msgspec.Struct, frozen=True, kw_only=True):
    gamma: Gamma
    """Bin width ratio: ``(1 + a) / (1 - a)`` for relative accuracy ``a``."""
    offset: Key
    """Key of ``counts[0]``."""
    counts: Annotated[list[Seq], Meta(max_length=SKETCH_BINS_MAX)]
    zeros: Seq = 0
    sum: NonNegative = 0.0
    """Exact sum of the values (ms), for the mean."""
    min: NonNegative | None = None
    max: NonNegative | None = None
    """Exact extremes of the values; ``None`` when the sketch is empty."""
    v: int = 1

    @property
    def count(self) -> int:
        return self.zeros + sum(self.counts)


_DECODER: Final = msgspec.msgpack.Decoder(SketchWire)
_FIELDS: Final = 8


def encode_sketch(s: SketchWire) -> bytes:
    """MessagePack of ``s``. Encoding does not validate; :func:`decode_sketch` does."""
    return msgspec.msgpack.encode(s)


def decode_sketch(
    payload: bytes, limits: Limits = DEFAULT_LIMITS, *, max_bytes: int = SKETCH_MAX_BYTES
) -> SketchWire:
    """Decode and check a sketch; raises only :class:`~schemas.errors.ContractError`.

    ``payload_too_large`` beyond ``max_bytes`` (or ``limits.max_payload_bytes``); the usual
    ``malformed``/``bad_version``/``bad_schema`` otherwise. ``bad_schema`` also covers a
    layout no sketch can have: keys beyond the bound, a total beyond 2**53, ``min > max``,
    extremes on an empty sketch or missing on a non-empty one.
    """
    if len(payload) > max_bytes:
        raise ContractError("payload_too_large", f"sketch: {len(payload)} bytes > {max_bytes}")
    payload = check_size(payload, limits)
    budget = 1 + 2 * _FIELDS + SKETCH_BINS_MAX + limits.max_extra_items
    s = decode_msgpack(payload, _DECODER.decode, what="sketch", limits=limits, budget=budget)
    if s.offset + len(s.counts) - 1 > SKETCH_KEY_MAX:
        raise ContractError("bad_schema", "sketch: bins run past the key bound")
    total = s.count
    if total > SKETCH_COUNT_MAX or total > SEQ_MAX:
        raise ContractError("bad_schema", f"sketch: total count {total} > 2**53")
    if total == 0:
        if s.min is not None or s.max is not None or s.sum != 0.0:
            raise ContractError("bad_schema", "sketch: empty, yet has min/max/sum")
    elif s.min is None or s.max is None or s.min > s.max:
        raise ContractError("bad_schema", "sketch: min/max missing or min > max")
    return s

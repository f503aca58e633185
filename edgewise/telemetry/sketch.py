"""A mergeable latency quantile sketch: DataDog's ``ddsketch`` underneath, our wire layout
(:class:`schemas.sketch.SketchWire`) on the network (ADR 0040).

Every sketch in the fleet has the same relative accuracy (1 %) and bin limit (2048, the
lowest bins collapse beyond it, so memory is bounded and high quantiles keep their accuracy),
so any two merge: the fleet p99 is the p99 of the merged node sketches.
"""

from __future__ import annotations

import math
from typing import Final, Self

from ddsketch import LogCollapsingLowestDenseDDSketch

from schemas import (
    DEFAULT_LIMITS,
    SKETCH_BINS_MAX,
    SKETCH_MAX_BYTES,
    ContractError,
    Limits,
    SketchWire,
    decode_sketch,
    encode_sketch,
)

from .errors import BadSketch

RELATIVE_ACCURACY: Final = 0.01
BIN_LIMIT: Final = SKETCH_BINS_MAX


class LatencySketch:
    """Latencies in milliseconds; quantiles within 1 % of the true value (relative error).

    ``add``, ``merge``, ``quantile``, ``count``; ``to_bytes``/``from_bytes`` for the wire.
    """

    __slots__ = ("_sketch",)

    def __init__(self) -> None:
        self._sketch = LogCollapsingLowestDenseDDSketch(RELATIVE_ACCURACY, BIN_LIMIT)

    # ------------------------------------------------------------------ values
    def add(self, ms: float) -> None:
        """Record one latency; ``ValueError`` if it is negative, NaN or infinite."""
        if not (math.isfinite(ms) and ms >= 0.0):
            raise ValueError(f"a latency must be a finite number >= 0 ms, got {ms!r}")
        self._sketch.add(float(ms))

    def merge(self, other: LatencySketch) -> None:
        """Add every value of ``other`` to this sketch (``other`` is unchanged)."""
        self._sketch.merge(other._sketch)

    @property
    def count(self) -> int:
        count: float = self._sketch.count
        return round(count)

    @property
    def min(self) -> float | None:
        return self._sketch._min if self.count else None

    @property
    def max(self) -> float | None:
        return self._sketch._max if self.count else None

    @property
    def sum(self) -> float:
        return float(self._sketch.sum)

    def quantile(self, q: float) -> float | None:
        """The value at quantile ``q`` (0..1), within 1 %; ``None`` when the sketch is empty.

        ``quantile(0)``/``quantile(1)`` are the exact min/max; others are clamped to them.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile is in 0..1, got {q!r}")
        if self.count == 0:
            return None
        if q in (0.0, 1.0):
            return float(self._sketch._min if q == 0.0 else self._sketch._max)
        value = self._sketch.get_quantile_value(q)
        if value is None:  # pragma: no cover - only for an empty sketch, handled above
            return None
        return min(max(float(value), self._sketch._min), self._sketch._max)

    # ------------------------------------------------------------------ wire
    def to_wire(self) -> SketchWire:
        s = self._sketch
        store = s._store
        if store.count:
            lo, hi = store.min_key, store.max_key
            counts = [round(c) for c in store.bins[lo - store.offset : hi - store.offset + 1]]
        else:
            lo, counts = 0, []
        empty = self.count == 0
        return SketchWire(
            gamma=s._mapping.gamma,
            offset=int(lo),
            counts=counts,
            zeros=round(s._zero_count),
            sum=0.0 if empty else float(s._sum),
            min=None if empty else float(s._min),
            max=None if empty else float(s._max),
        )

    def to_bytes(self) -> bytes:
        """The encoded sketch (MessagePack, :class:`~schemas.sketch.SketchWire`)."""
        return encode_sketch(self.to_wire())

    @classmethod
    def from_bytes(
        cls, data: bytes, max_bytes: int = SKETCH_MAX_BYTES, limits: Limits = DEFAULT_LIMITS
    ) -> Self:
        """Decode untrusted bytes; raises only :class:`~edgewise.telemetry.errors.BadSketch`.

        Refused before decoding beyond ``max_bytes``; depth, length and layout checked by
        :func:`schemas.decode_sketch`; then the sketch must be mergeable with ours (same
        gamma, keys that map to finite values).
        """
        try:
            wire = decode_sketch(data, limits, max_bytes=max_bytes)
        except ContractError as exc:
            raise BadSketch(exc.reason, exc.detail) from None
        return cls.from_wire(wire)

    @classmethod
    def from_wire(cls, wire: SketchWire) -> Self:
        """A sketch from a decoded layout; :class:`BadSketch` (``incompatible``) unless it
        merges with ours."""
        out = cls()
        s = out._sketch
        mapping = s._mapping
        if wire.gamma != mapping.gamma:
            raise BadSketch(
                "incompatible",
                f"gamma {wire.gamma!r} is not this fleet's {mapping.gamma!r} "
                f"(relative accuracy {RELATIVE_ACCURACY})",
            )
        if wire.counts:
            lowest = mapping.key(mapping.min_possible)
            highest = mapping.key(mapping.max_possible)
            last = wire.offset + len(wire.counts) - 1
            if wire.offset < lowest or last > highest:
                raise BadSketch(
                    "incompatible",
                    f"bin keys {wire.offset}..{last} outside {lowest}..{highest}",
                )
        store = s._store
        for i, c in enumerate(wire.counts):
            if c:
                store.add(wire.offset + i, float(c))
        s._zero_count = float(wire.zeros)
        s._count = float(wire.count)
        if wire.count:
            assert wire.min is not None and wire.max is not None  # decode_sketch checked
            s._sum, s._min, s._max = wire.sum, wire.min, wire.max
        return out

    def __repr__(self) -> str:
        if not self.count:
            return "LatencySketch(count=0)"
        return (
            f"LatencySketch(count={self.count}, p50={self.quantile(0.5):.3g} ms, "
            f"p99={self.quantile(0.99):.3g} ms)"
        )


def merged(sketches: list[LatencySketch]) -> LatencySketch:
    """A new sketch holding the values of all of ``sketches``."""
    out = LatencySketch()
    for s in sketches:
        out.merge(s)
    return out

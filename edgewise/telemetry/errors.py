"""Exceptions raised by :mod:`edgewise.telemetry`.

The wire contract's :class:`~schemas.errors.ContractError` (from decoding a sketch) is
translated here, at one boundary (:meth:`edgewise.telemetry.sketch.LatencySketch.from_bytes`).
Invalid arguments from the program itself (a negative latency, a quantile outside 0..1, a
counter name the contract refuses) raise ``ValueError`` at once.

Tree::

    TelemetryError         base class
    └── BadSketch          bytes that are not a sketch this fleet can merge (also a ValueError):
                           ``reason`` is the contract's reason code (``payload_too_large``,
                           ``malformed``, ``bad_version``, ``bad_schema``) or ``incompatible``
                           (another relative accuracy or key range); ``detail`` says more
"""

from __future__ import annotations


class TelemetryError(Exception):
    """Base class of every error raised by telemetry."""


class BadSketch(TelemetryError, ValueError):
    """Untrusted bytes that do not hold a mergeable latency sketch."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

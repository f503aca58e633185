"""Telemetry every edgewise service publishes: windows of counts and a mergeable latency
sketch (see docs/telemetry.md).

* :class:`LatencySketch` (:mod:`edgewise.telemetry.sketch`): DDSketch, 1 % relative accuracy,
  bounded bins, mergeable, with the wire layout of :class:`schemas.SketchWire`;
* :class:`TelemetryWindow` (:mod:`edgewise.telemetry.window`): turns cumulative counters and
  observed latencies into :class:`schemas.Telemetry` windows;
* :func:`host_metrics` (:mod:`edgewise.telemetry.host`): RSS, CPU temperature, uptime.

Exceptions live in :mod:`edgewise.telemetry.errors` (tree in its docstring).
"""

from edgewise.telemetry.errors import BadSketch, TelemetryError
from edgewise.telemetry.host import HostMetrics, cpu_temp_c, host_metrics
from edgewise.telemetry.sketch import RELATIVE_ACCURACY, LatencySketch, merged
from edgewise.telemetry.window import TelemetryWindow, deltas

__all__ = [
    "RELATIVE_ACCURACY",
    "BadSketch",
    "HostMetrics",
    "LatencySketch",
    "TelemetryError",
    "TelemetryWindow",
    "cpu_temp_c",
    "deltas",
    "host_metrics",
    "merged",
]

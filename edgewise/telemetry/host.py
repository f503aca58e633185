"""What the host says about this process: resident memory, CPU temperature, uptime.

The only module of :mod:`edgewise.telemetry` that reads the system (psutil, sysfs); everything it
returns is plain data for :meth:`edgewise.telemetry.window.TelemetryWindow.build`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil

THERMAL_ROOT: Final = Path("/sys/class/thermal")
# psutil sensor names that are the CPU/SoC package, best first (Intel, AMD, Raspberry Pi, ARM).
_CPU_SENSORS: Final = ("coretemp", "k10temp", "zenpower", "cpu_thermal", "soc_thermal", "cpu")
_CPU_ZONES: Final = ("x86_pkg_temp", "cpu", "soc", "acpitz")


@dataclass(frozen=True, slots=True)
class HostMetrics:
    rss_bytes: int | None
    cpu_temp_c: float | None
    """``None`` where the OS exposes no temperature (containers, VMs, macOS)."""
    uptime_s: float
    """Seconds since this process started."""


def _plausible(celsius: float) -> float | None:
    return celsius if -273.15 <= celsius <= 1000.0 else None


def cpu_temp_c(thermal_root: Path = THERMAL_ROOT) -> float | None:
    """The CPU temperature in °C: psutil's sensors, else the kernel's thermal zones, else
    ``None``."""
    reader = getattr(psutil, "sensors_temperatures", None)  # absent on macOS and Windows
    if reader is not None:
        try:
            sensors = reader()
        except (OSError, RuntimeError, ValueError):
            sensors = {}
        for name in (*_CPU_SENSORS, *sorted(sensors)):
            for entry in sensors.get(name, ()):
                value = None if entry.current is None else _plausible(float(entry.current))
                if value is not None:
                    return value
    return zone_temp_c(thermal_root)


def zone_temp_c(thermal_root: Path = THERMAL_ROOT) -> float | None:
    """The hottest CPU-like thermal zone (``/sys/class/thermal/thermal_zone*/temp``, milli-°C),
    or of all zones when none is named like a CPU; ``None`` when there are none."""
    readings: list[tuple[bool, float]] = []
    with contextlib.suppress(OSError):
        for zone in sorted(thermal_root.glob("thermal_zone*")):
            try:
                kind = (zone / "type").read_text(encoding="ascii", errors="replace").strip()
                milli = int((zone / "temp").read_text(encoding="ascii").strip())
            except (OSError, ValueError):
                continue
            value = _plausible(milli / 1000.0)
            if value is not None:
                readings.append((any(k in kind.lower() for k in _CPU_ZONES), value))
    if not readings:
        return None
    cpu_like = [v for is_cpu, v in readings if is_cpu]
    return max(cpu_like or [v for _, v in readings])


def host_metrics(now: float | None = None, *, process: psutil.Process | None = None) -> HostMetrics:
    """RSS, CPU temperature and uptime of this process (``now``: wall clock, epoch s)."""
    proc = process or psutil.Process()
    now = time.time() if now is None else now
    try:
        rss: int | None = int(proc.memory_info().rss)
        started = float(proc.create_time())
    except (psutil.Error, OSError):
        rss, started = None, now
    return HostMetrics(rss_bytes=rss, cpu_temp_c=cpu_temp_c(), uptime_s=max(0.0, now - started))

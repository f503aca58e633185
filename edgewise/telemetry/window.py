"""One node's telemetry windows: latencies go into the current window's sketch; ``build``
closes the window into a :class:`schemas.Telemetry` and opens the next.

Pure apart from :func:`edgewise.telemetry.host.host_metrics` (used only when ``build`` is not given
``host``): the caller passes the clock and the cumulative counters it keeps anyway.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from schemas import Telemetry, new_id
from schemas.status import State
from schemas.telemetry import COUNTER_KEY_PATTERN, COUNTER_KEYS_MAX

from .host import HostMetrics, host_metrics
from .sketch import LatencySketch

_KEY: Final = re.compile(COUNTER_KEY_PATTERN)


def _checked(what: str, counters: Mapping[str, int]) -> dict[str, int]:
    if len(counters) > COUNTER_KEYS_MAX:
        raise ValueError(f"{what}: {len(counters)} counters > {COUNTER_KEYS_MAX}")
    out: dict[str, int] = {}
    for key, value in counters.items():
        if not _KEY.match(key):
            raise ValueError(f"{what}: counter name {key!r} is not [a-z][a-z0-9_]{{0,63}}")
        if type(value) is not int or value < 0:
            raise ValueError(f"{what}[{key!r}] must be an int >= 0, got {value!r}")
        out[key] = value
    return out


def deltas(now: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    """Per-window deltas of cumulative counters. A counter that went down was reset (a new
    outbox, a restarted component): its delta is its new value."""
    return {k: v - before.get(k, 0) if v >= before.get(k, 0) else v for k, v in now.items()}


class TelemetryWindow:
    """Builds a node's telemetry windows.

    ``started_at`` (epoch s) opens the first window; each :meth:`build` closes the current
    one at ``now`` and opens the next. ``seq`` counts windows from 0 within ``boot_id``.
    """

    def __init__(self, *, node: str, boot_id: str, started_at: float) -> None:
        self.node = node
        self.boot_id = boot_id
        self.seq = 0
        self._window_start = started_at
        self._sketch = LatencySketch()
        self._counts: dict[str, int] = {}
        self._rejects: dict[str, int] = {}

    @property
    def sketch(self) -> LatencySketch:
        """The current window's latencies (read-only use: :meth:`build` replaces it)."""
        return self._sketch

    def observe_latency(self, ms: float) -> None:
        """Record one frame's latency in ms (``ValueError`` if negative or not finite)."""
        self._sketch.add(ms)

    def build(
        self,
        now: float,
        *,
        counts_total: Mapping[str, int],
        rejects_total: Mapping[str, int],
        evictions: Mapping[str, int],
        outbox_rows: int,
        outbox_bytes: int,
        state: State,
        reasons: Iterable[str] = (),
        model: str | None = None,
        release: int | None = None,
        runtime: str | None = None,
        provider: str | None = None,
        hardware_class: str | None = None,
        host: HostMetrics | None = None,
    ) -> Telemetry:
        """Close the window at ``now`` (epoch s) into a message and start the next one.

        ``counts_total``/``rejects_total`` are cumulative since the node started (the
        window's deltas are computed here); ``evictions`` cumulative since the outbox was
        created, sent as is. ``host`` defaults to :func:`~edgewise.telemetry.host.host_metrics`.
        ``ValueError`` for counter names or values the contract would refuse (nothing is
        changed then).
        """
        counts = _checked("counts_total", counts_total)
        rejects = _checked("rejects_total", rejects_total)
        evicted = _checked("evictions", evictions)
        host = host or host_metrics(now)
        sketch = self._sketch
        message = Telemetry(
            node=self.node,
            id=new_id(),
            boot_id=self.boot_id,
            seq=self.seq,
            ts=now,
            window_s=max(0.0, now - self._window_start),
            state=state,
            reasons=list(reasons),
            model=model,
            release=release,
            runtime=runtime,
            provider=provider,
            hardware_class=hardware_class,
            counts=deltas(counts, self._counts),
            rejects=deltas(rejects, self._rejects),
            evictions=evicted,
            outbox_rows=outbox_rows,
            outbox_bytes=outbox_bytes,
            latency=sketch.to_bytes(),
            latency_count=sketch.count,
            rss_bytes=host.rss_bytes,
            cpu_temp_c=host.cpu_temp_c,
            uptime_s=host.uptime_s,
        )
        self._counts, self._rejects = counts, rejects
        self._sketch = LatencySketch()
        self._window_start = now
        self.seq += 1
        return message

"""Rejections on the control topics (commands, manifests, key sets, chunks), kept in bounds.

Anyone who can publish on those topics can send garbage far faster than a node should write
log lines or publish events about it (a flood on ``edge/{node}/cmd`` once made 405 log lines a
second and as many retained events). Every rejection is counted, by topic kind and reason;
each ``(kind, reason)`` is logged at most once per ``log_interval_s``, the line saying how many
more came since the last one; and each is reported (an update event, or a dead letter for
chunks) through a token bucket of its own: ``events_per_s`` after a burst of ``burst``, so
garbage of one reason never uses up the reports of another (a genuine release refused as
``older_release`` is still reported while ``malformed`` garbage floods in). Wire text in the
log line is escaped (:func:`schemas.log_text`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from edge_node.token_bucket import TokenBucket
from edgewise.releases import Reason
from schemas import log_text

log = logging.getLogger(__name__)

Kind = Literal["command", "manifest", "keys", "chunk"]


@dataclass(frozen=True, slots=True)
class Rejection:
    kind: Kind
    topic: str
    reason: Reason
    detail: str
    payload: bytes = b""
    ref: str | None = None
    release: int | None = None


class ControlRejects:
    def __init__(
        self,
        report: Callable[[Rejection], None],
        *,
        events_per_s: float = 1.0,
        burst: int = 10,
        log_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._report = report
        self._rate = events_per_s
        self._burst = float(burst)
        self._log_interval_s = log_interval_s
        self._clock = clock
        self._buckets: dict[tuple[Kind, Reason], TokenBucket] = {}
        self._last_log: dict[tuple[Kind, Reason], float] = {}
        self._unlogged: Counter[tuple[Kind, Reason]] = Counter()
        self.counts: Counter[str] = Counter()
        """Rejections by ``kind:reason``."""
        self.reported = 0
        self.suppressed = 0
        """Rejections counted and logged but not reported (over the rate cap)."""

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reject(self, r: Rejection) -> bool:
        """Count, maybe log, maybe report ``r``; True if it was reported."""
        key = (r.kind, r.reason)
        self.counts[f"{r.kind}:{r.reason.value}"] += 1
        now = self._clock()
        self._log(key, r, now)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst, now)
        if not bucket.take(now):
            self.suppressed += 1
            return False
        self.reported += 1
        self._report(r)
        return True

    def _log(self, key: tuple[Kind, Reason], r: Rejection, now: float) -> None:
        last = self._last_log.get(key)
        if last is not None and now - last < self._log_interval_s:
            self._unlogged[key] += 1
            return
        more = self._unlogged.pop(key, 0)
        log.warning(
            "rejected %s on %s: %s: %s%s%s",
            r.kind,
            log_text(r.topic, 128),
            r.reason.value,
            log_text(r.detail),
            f" (ref {log_text(r.ref, 64)})" if r.ref else "",
            f" (+{more} more since the last line)" if more else "",
        )
        self._last_log[key] = now

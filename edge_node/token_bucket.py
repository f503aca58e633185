"""A token bucket: at most ``rate_per_s`` takes a second on average, bursts of ``capacity``.

What keeps reports of rejected input (dead letters, control-topic rejections) in bounds when
garbage floods in: each take refills the bucket by the time passed since the last one, then
spends one token if a whole one is there. The caller passes the time, so one clock serves a
bucket and the log lines about it.
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("_at", "_capacity", "_rate", "_tokens")

    def __init__(self, rate_per_s: float, capacity: float, now: float) -> None:
        """A full bucket at ``now``; a rate of 0 or less lets nothing through."""
        self._rate = rate_per_s
        self._capacity = capacity if rate_per_s > 0 else 0.0
        self._tokens = self._capacity
        self._at = now

    def take(self, now: float) -> bool:
        """Refill for the time since the last take, then take one token; False if none."""
        self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

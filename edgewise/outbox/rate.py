"""The rate cap: a token bucket for what a forwarder sends (the backlog's drain, and all)."""

from __future__ import annotations

import time


class TokenBucket:
    """At most ``rate`` takes per second on average, bursts of up to ``rate / 10`` (>= 1)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate / 10.0)
        self._tokens = self.capacity
        self._at = time.monotonic()

    def available(self) -> int:
        if self.rate <= 0:
            return 1 << 30
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return int(self._tokens)

    def take(self, n: int) -> None:
        if self.rate > 0:
            self._tokens -= n

    def wait_s(self) -> float:
        """Time until one more token is available."""
        if self.rate <= 0:
            return 0.0
        return max(0.0, (1.0 - self._tokens) / self.rate)

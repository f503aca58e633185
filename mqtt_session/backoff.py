"""Reconnect delays: exponential growth, a cap, and full jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays for successive reconnect attempts.

    Attempt ``n`` (0-based) waits a uniformly random time in
    ``[first_s / 2, min(cap_s, first_s * 2**n)]``, so a fleet that lost its broker at the same
    moment does not come back at the same moment.
    """

    first_s: float = 0.5
    cap_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.first_s <= 0:
            raise ValueError("first_s must be > 0")
        if self.cap_s < self.first_s:
            raise ValueError("cap_s must be >= first_s")

    def next_delay_s(self) -> float:
        ceiling = min(self.cap_s, self.first_s * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return self.rng.uniform(min(self.first_s / 2, ceiling), ceiling)

    def reset(self) -> None:
        self.attempt = 0

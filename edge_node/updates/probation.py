"""The health window after a swap: what the node serves is judged on its own traffic."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_node.updates.config import UpdatesConfig


@dataclass
class ProbationWindow:
    """Per-inference outcomes since activation; :meth:`verdict` judges them."""

    config: UpdatesConfig
    inferences: int = 0
    failures: int = 0
    non_finite: int = 0
    confidence_sum: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    def observe(
        self,
        *,
        count: int,
        failed: int = 0,
        non_finite: int = 0,
        confidence_sum: float = 0.0,
        latency_s: float | None = None,
    ) -> None:
        self.inferences += count
        self.failures += failed
        self.non_finite += non_finite
        self.confidence_sum += confidence_sum
        if latency_s is not None and len(self.latencies_s) < 100_000:
            self.latencies_s.extend([latency_s] * max(1, count - failed))

    @property
    def enough(self) -> bool:
        return self.inferences >= self.config.probation_min_inferences

    def verdict(self) -> str | None:
        """None if healthy; else why not."""
        c = self.config
        n = self.inferences
        if n == 0:
            return None
        if self.failures / n > c.probation_max_error_rate:
            return f"error rate {self.failures}/{n} > {c.probation_max_error_rate:.2%}"
        if self.non_finite / n > c.probation_max_non_finite_rate:
            return f"non-finite outputs {self.non_finite}/{n}"
        answered = n - self.failures - self.non_finite
        if answered > 0:
            mean = self.confidence_sum / answered
            if mean < c.probation_min_mean_confidence:
                return f"confidence collapsed: mean {mean:.3f} < {c.probation_min_mean_confidence}"
        if self.latencies_s:
            p99_ms = float(np.percentile(self.latencies_s, 99)) * 1000.0
            if p99_ms > c.probation_max_p99_ms:
                return f"p99 latency {p99_ms:.1f} ms > {c.probation_max_p99_ms} ms"
        return None

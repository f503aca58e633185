"""What the edge node counts since it started (telemetry, the stop line, tests), and how it
says a count in its log lines."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class NodeStats:
    """Counters since start; a snapshot is cheap to take."""

    frames_in: int = 0
    frames_ignored_draining: int = 0
    frames_already_answered: int = 0
    frames_left_to_other: int = 0
    """Frames not answered: another process took their connection over (client id conflict)."""
    results_out: int = 0
    results_stored: int = 0
    results_acked: int = 0
    """Results the broker acknowledged on the degraded path (published without a durable copy);
    the forwarder counts those it delivers from the outbox (EdgeNode.results_delivered)."""
    result_messages: int = 0
    publish_failures: int = 0
    inference_errors: int = 0
    session_recycles: int = 0
    telemetry_windows: int = 0
    acks_received: int = 0
    """End-to-end mode: confirmations taken from ``edge/{node}/acks``."""
    acks_rejected: int = 0
    """End-to-end mode: confirmations refused (size, encoding, schema): dead-lettered."""
    rejects: Counter[str] = field(default_factory=Counter)

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 record``, ``0 records``, ``2 records``."""
    return f"{n} {word if n == 1 else (words or word + 's')}"

"""What the escalator counts (the node's status and telemetry report them)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class EscalationStats:
    escalated: int = 0
    """Cases sent to the cloud (published)."""
    messages: int = 0
    """Escalation messages published (each holds one or more cases)."""
    cloud: int = 0
    cached: int = 0
    fallback: int = 0
    offline: int = 0
    overflow: int = 0
    """Decided ``edge_fallback`` at once because ``max_pending`` cases were waiting."""
    recovered: int = 0
    """Pending cases found in the journal at start (decided ``edge_fallback``)."""
    late_replies: int = 0
    """Verdicts for cases decided already (late or duplicate), ignored."""
    replies: int = 0
    """Verdicts accepted (each resolves one case)."""
    hard_examples_stored: int = 0
    hard_examples_lost: int = 0
    reply_rejects: Counter[str] = field(default_factory=Counter)
    """By reason: whole reply messages (malformed, wrong_node, ...) and single verdicts
    (unknown_escalation, wrong_correlation)."""
    batch_sizes: Counter[int] = field(default_factory=Counter)
    """Escalation messages by number of cases."""
    unavailable_fallback: int = 0
    """Cases decided ``edge_fallback`` because the cloud was unavailable (at once, or pending
    when the last worker went offline); counted in ``fallback`` too."""
    unavailable_episodes: int = 0
    """Times the cloud became unavailable."""
    probes: int = 0
    """Probe cases sent while the cloud was unavailable."""
    probe_replies: int = 0
    """In-time verdicts for probes."""
    finals_lost: int = 0
    """Final results given up because storing them failed for a reason other than storage
    (a bug, a fault); their frames were acknowledged when they were journaled."""
    presence_rejects: int = 0
    """Presence messages that were not a valid status of the worker their topic names."""

    @property
    def replies_rejected(self) -> int:
        return sum(self.reply_rejects.values())

"""What a worker counts: :class:`WorkerStats` (totals since it started)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class WorkerStats:
    received: int = 0
    """Escalation messages received (each holds one or more cases)."""
    cases: int = 0
    """Cases in the messages accepted."""
    answered: int = 0
    """Cases answered by a handler (each once)."""
    replies: int = 0
    """Reply messages acknowledged by the broker."""
    verdicts: int = 0
    """Verdicts in those replies (cases answered again as duplicates included)."""
    duplicates: int = 0
    """Cases seen before (answered with the answer given then)."""
    expired: int = 0
    """Cases dropped unanswered because their deadline had passed."""
    uploads: int = 0
    """Hard-example upload cases (no reply wanted) stored."""
    batches: int = 0
    """Handler calls."""
    handled: int = 0
    """Inputs in those calls (``handled / batches``: the batch size the worker forms)."""
    handler_errors: int = 0
    store_errors: int = 0
    reply_failures: int = 0
    ignored_draining: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    """Messages rejected, by reason."""
    failures: Counter[str] = field(default_factory=Counter)
    """Unexpected failures (a bug, a fault) by the stage they stopped: ``intake`` (decode or
    checks: the message is rejected, reason ``internal_error``), ``store`` (its rows: the reply
    goes all the same), ``answer`` (a batch between intake and the handler: its cases go
    unanswered), ``reply`` (making or sending it: the cases go unanswered). Each message
    is settled and acknowledged all the same: one bad message never holds back the others."""

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())

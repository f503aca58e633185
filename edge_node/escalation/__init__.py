"""Hybrid inference, the node's side: policy, pending escalations, replies, verdict cache.

:class:`Escalator` is the one object a node talks to (see its module docstring), wiring
:mod:`.pending` (each case resolved once, then delivered), :mod:`.publish` (cases out in
batches; hard examples), :mod:`.replies` (verdicts in, checked) and :mod:`.availability` (is the
cloud there); :mod:`.cases` the types handed over and back, :mod:`.stats` the counts;
:mod:`edge_node.escalation.policy` holds the pure tests (max softmax, top-2 margin, entropy);
:mod:`edge_node.escalation.journal` the durable record of acknowledged, still-pending frames.
Design: docs/adr/0030-escalation.md, docs/adr/0031-escalation-acks.md,
docs/adr/0032-escalation-batches.md.
"""

from edge_node.escalation.cache import CloudVerdict, VerdictCache, input_key
from edge_node.escalation.config import EscalationConfig, PolicyConfig
from edge_node.escalation.escalator import (
    HARD_EXAMPLE,
    Case,
    Deliver,
    EscalationStats,
    Escalator,
    Final,
    Triage,
)
from edge_node.escalation.journal import Journal, JournalError
from edge_node.escalation.policy import Assessment, assess, edge_verdict, probabilities

__all__ = [
    "HARD_EXAMPLE",
    "Assessment",
    "Case",
    "CloudVerdict",
    "Deliver",
    "EscalationConfig",
    "EscalationStats",
    "Escalator",
    "Final",
    "Journal",
    "JournalError",
    "PolicyConfig",
    "Triage",
    "VerdictCache",
    "assess",
    "edge_verdict",
    "input_key",
    "probabilities",
]

"""What the node hands the escalator and what comes back: cases, final results, triage."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import numpy as np

from edge_node.escalation.cache import CloudVerdict
from schemas import EdgeVerdict, Result, Source


@dataclass(slots=True)
class Case:
    """One unsure verdict, as the node hands it over."""

    result: Result
    """The provisional result: edge verdict, ``source="edge"``, its final id already given."""
    frame_key: str
    tensor: np.ndarray
    verdict: EdgeVerdict
    received_at: float
    """``time.monotonic()`` when the frame arrived (the final result's latency counts from it)."""


@dataclass(frozen=True, slots=True)
class Final:
    frame_key: str
    result: Result


Deliver = Callable[[list[Final]], Awaitable[None]]


@dataclass(slots=True)
class Triage:
    rows: list[int]
    verdicts: list[EdgeVerdict]


@dataclass(slots=True)
class Entry:
    """A case sent to the cloud (pending, or a probe)."""

    case: Case
    corr: str
    key: str
    deadline: float
    message_corr: bytes | None = None
    """The ``corr`` of the message that carried the case, as bytes (set when it is sent)."""


def final_of(c: Case, source: Source, verdict: CloudVerdict | None = None) -> Final:
    """``c``'s final result: decided by ``source`` (with the cloud's ``verdict``, if any)."""
    changes: dict[str, object] = {
        "source": source,
        "latency_ms": max(0.0, (time.monotonic() - c.received_at) * 1000.0),
    }
    if verdict is not None:
        changes["label"] = verdict.label
        changes["confidence"] = min(1.0, max(0.0, verdict.confidence))
    return Final(c.frame_key, msgspec.structs.replace(c.result, **changes))

"""What the worker's pipeline carries: an escalation message in hand (:class:`Message`), its
cases as jobs for a model's batch (:data:`Job`), and the handler batches made of them."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from cloud_worker.handler import Batch, Verdict
from cloud_worker.store import Answer
from edgewise.mqtt import Inbound
from edgewise.serving.acks import Ticket
from schemas import DTYPES, Escalation, EscalationBatch


class Message:
    """One escalation message in hand: settled (replied to, stored, acknowledged) once none of
    its cases is waiting any more."""

    __slots__ = ("answered", "batch", "msg", "stored", "ticket", "unsettled", "waiting")

    def __init__(self, batch: EscalationBatch, msg: Inbound, ticket: Ticket) -> None:
        self.batch = batch
        self.msg = msg
        self.ticket = ticket
        self.waiting = 0
        """Cases not yet decided."""
        self.unsettled = 0
        """Once replied to: the reply's PUBACK and the rows' commits not yet in."""
        self.answered: list[tuple[Escalation, Answer]] = []
        self.stored: list[asyncio.Future[Any]] = []


Job = tuple[Escalation, Message]
"""One case of a message, as it waits for its model's batch."""

Outcome = tuple[list[Job], Sequence[Verdict] | Exception]
"""A group of cases sharing an input kind, and the handler's verdicts for them or its error."""

NO_COPIES: Final[list[Job]] = []
"""``in_progress`` value of a case id no other message has sent meanwhile (shared, never
appended to)."""


def by_input_kind(jobs: list[Job]) -> list[list[Job]]:
    """``jobs`` split by input dtype and shape (one group in the usual case), order kept."""
    if not jobs:
        return []
    first = jobs[0][0]
    dtype, shape = first.dtype, first.shape
    if all(esc.dtype == dtype and esc.shape == shape for esc, _ in jobs):
        return [jobs]
    groups: dict[tuple[str, tuple[int, ...]], list[Job]] = defaultdict(list)
    for job in jobs:
        groups[(job[0].dtype, tuple(job[0].shape))].append(job)
    return list(groups.values())


def prepare(model: str, group: list[Job]) -> tuple[list[Job], Batch | Exception]:
    """``group`` (one input kind) and its handler batch, or why it could not be made."""
    try:
        return group, Batch(model, stack(group), [esc for esc, _ in group])
    except Exception as exc:  # a bad group must not stop the others
        return group, exc


def stack(group: list[Job]) -> np.ndarray:
    """The group's inputs (one dtype and shape, checked when their message was decoded) as one
    writable ``[N, *shape]`` array (one copy of the bytes)."""
    first = group[0][0]
    data = bytearray().join([esc.data for esc, _ in group])
    return np.frombuffer(data, dtype=DTYPES[first.dtype]).reshape(len(group), *first.shape)

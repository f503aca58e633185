"""Each case decided once: the handler's verdicts (or a stored answer) become answers, recorded
for duplicates and as hard-example rows, and every message that sent the case (the copies that
came in other messages meanwhile) hears of it; a message none of whose cases waits any more goes
to be settled."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cloud_worker.cache import BoundedCache
from cloud_worker.errors import HandlerError
from cloud_worker.handler import Handler, Verdict, Verdicts
from cloud_worker.jobs import Job, Message, Outcome
from cloud_worker.rows import epoch_of
from cloud_worker.stats import WorkerStats
from cloud_worker.store import Answer, HardExampleStore, Row, example_row

log = logging.getLogger(__name__)


class Decider:
    """Decides the cases of a batch and tells their messages."""

    def __init__(
        self,
        worker_id: str,
        *,
        stats: WorkerStats,
        answered: BoundedCache[Answer],
        in_progress: dict[str, list[Job]],
        store: HardExampleStore,
        settle: Callable[[Message], None],
    ) -> None:
        self.worker_id = worker_id
        self.stats = stats
        self.answered = answered
        """Recent answers by case id (a duplicate gets the answer given then)."""
        self.in_progress = in_progress
        """Case ids between intake and answer -> the copies of them other messages sent
        meanwhile (answered together with the first)."""
        self.store = store
        self.settle = settle

    def decide(
        self,
        model: str,
        handler: Handler,
        jobs: list[Job],
        known: dict[str, Answer],
        outcomes: list[Outcome],
    ) -> None:
        """Settle ``jobs``: the ``known`` answers, then each group's verdicts or failure."""
        if known:
            for job in jobs:
                found = known.get(job[0].id)
                if found is not None:
                    self.stats.duplicates += 1
                    self.answered.put(job[0].id, found)
                    self.case_done(job, found, None)
        decided: list[tuple[Job, Answer | None]] = []
        rows: list[Row] = []
        for group, out in outcomes:
            answers: Sequence[Answer | None] = [None] * len(group)
            if isinstance(out, Exception):
                self._handler_failed(model, group, out)
            else:
                try:
                    answers = self.answers_of(handler, out)
                except Exception as exc:  # verdicts of the wrong type
                    self._handler_failed(model, group, exc)
                else:
                    self.stats.batches += 1
                    self.stats.handled += len(group)
                    self.stats.answered += len(group)
                    self.answered.put_many([esc.id for esc, _ in group], answers)
                    rows.extend(self._rows(group, answers))
            decided.extend(zip(group, answers, strict=True))
        stored: asyncio.Future[Any] | None = None
        if rows:
            try:
                stored = self.store.add_many(rows)
            except Exception as exc:  # the answers still go out; the rows are lost
                self.stats.failures["store"] += 1
                self.stats.store_errors += 1
                log.error("hard examples not stored (%d rows): %s", len(rows), exc)
        for job, answer in decided:
            # No answer (the handler failed): the case is left out of the reply, so the node
            # falls back at its deadline, and its message is still acknowledged, so the broker
            # does not hand the same failing input out again and again.
            self.case_done(job, answer, stored)

    def _handler_failed(self, model: str, group: list[Job], exc: Exception) -> None:
        self.stats.handler_errors += 1
        log.error("handler for %r failed on %d inputs: %s", model, len(group), exc)

    def _rows(self, group: list[Job], answers: Sequence[Answer]) -> list[Row]:
        """The hard-example rows of a group's answered cases."""
        rows: list[Row] = []
        shapes: dict[tuple[int, ...], str] = {}  # the JSON of each shape, once
        now, mono = time.time(), time.monotonic()
        for (esc, parent), answer in zip(group, answers, strict=True):
            key = tuple(esc.shape)
            text = shapes.get(key)
            if text is None:
                text = shapes[key] = json.dumps(esc.shape)
            rows.append(
                example_row(
                    esc, answer, received_at=epoch_of(parent.msg.received_at, now, mono),
                    answered_at=now,
                    shape_text=text,
                )
            )  # fmt: skip
        return rows

    def case_done(
        self, job: Job, answer: Answer | None, stored: asyncio.Future[Any] | None
    ) -> None:
        """``job``'s case is decided (``answer`` None: no answer); so are the copies of it that
        came in other messages meanwhile."""
        esc, parent = job
        copies = self.in_progress.pop(esc.id, None)
        if copies is None:
            return  # decided already
        if stored is not None and (not parent.stored or parent.stored[-1] is not stored):
            parent.stored.append(stored)  # the copies' messages do not wait for this row
        for esc, parent in (job, *copies):
            if answer is not None:
                parent.answered.append((esc, answer))
            parent.waiting -= 1
            if parent.waiting == 0:
                self.settle(parent)

    def answers_of(self, handler: Handler, verdicts: Sequence[Verdict]) -> list[Answer]:
        """The handler's verdicts as answers, confidence clamped to 0..1 (NaN: 0)."""
        version, worker = handler.version, self.worker_id
        if isinstance(verdicts, Verdicts):
            # fmax: NaN -> 0 (it returns the number of a NaN and a number), then at most 1.
            confidences = np.minimum(np.fmax(verdicts.confidences, 0.0), 1.0)
            return [
                Answer(label, confidence, version, worker)
                for label, confidence in zip(
                    verdicts.labels.tolist(), confidences.tolist(), strict=True
                )
            ]
        answers = []
        for v in verdicts:
            if not isinstance(v, Verdict):
                raise HandlerError(f"handler for {handler.model!r} returned {type(v).__name__}")
            c = float(v.confidence)
            confidence = 1.0 if c > 1.0 else c if c >= 0.0 else 0.0
            answers.append(Answer(int(v.label), confidence, version, worker))
        return answers

"""Inference and triage: one batch of frames from the batcher to results for the result path.

Per batch: leave the frames another process took over to it, skip those answered already, run
the served model (on its inference thread), dead-letter rows with non-finite output, send the
rows the escalation policy is unsure of to the cloud (docs/adr/0030-escalation.md), and put the
rest in the store queue. A failure of the model or a bug settles the batch (dead-lettered and
acknowledged): nothing from the network can stop the batcher, and with it the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import numpy as np

from edge_node.escalation import Case, Escalator
from edge_node.intake import FramesInHand, Pending
from edge_node.outbound import Tasks
from edge_node.results import ResultPath
from edge_node.served import ServedSlot
from edge_node.stats import NodeStats
from edge_node.status import NodeStatus
from edge_node.updates import UpdateManager
from edgewise.serving.model import Prediction
from schemas import EdgeVerdict, Result, new_ids

log = logging.getLogger(__name__)


class Answerer:
    """What the batcher runs on each batch."""

    def __init__(
        self,
        served: ServedSlot,
        *,
        frames: FramesInHand,
        results: ResultPath,
        status: NodeStatus,
        stats: NodeStats,
        tasks: Tasks,
        serving: asyncio.Event,
        escalator: Escalator | None,
        updates: UpdateManager | None,
        observe_latency_ms: Callable[[float], None],
    ) -> None:
        self._served = served
        self._frames = frames
        self._results = results
        self._status = status
        self._stats = stats
        self._tasks = tasks
        self._serving = serving
        self._escalator = escalator
        self._updates = updates
        self._observe_latency_ms = observe_latency_ms
        self._seq = 0

    async def process(self, batch: list[Pending]) -> None:
        if not self._serving.is_set():  # paused by an operator (docs/adr/0065-pause-inference.md)
            await self._serving.wait()
        try:
            await self._answer(batch)
        except Exception as exc:  # a bug must not stop the batcher, and with it the node
            log.exception("unexpected error on a batch of %d frames", len(batch))
            for p in batch:
                self._frames.reject(
                    p.ticket.message, "internal_error", f"{type(exc).__name__}: {exc}"
                )
            self._frames.finish(batch)
        finally:
            self._frames.resume_if_drained()

    async def _answer(self, batch: list[Pending]) -> None:
        batch, lost = self._frames.taken_over(batch)
        if lost:
            self._frames.forget(lost)
            if not batch:
                return
        if any(p.check for p in batch):
            batch = await self._results.skip_answered(batch)
            if not batch:
                return
        model = self._served.model
        try:
            inputs = np.stack([p.frame.tensor for p in batch])
            pred = await self._served.infer(inputs)
        except Exception as exc:  # a runtime failure must not stop the node
            if self._updates is not None:
                self._updates.observe(None, count=len(batch), latency_s=0.0)
            self._stats.inference_errors += 1
            log.exception("inference failed on a batch of %d", len(batch))
            self._status.set("model_unavailable", True)  # until a batch is served again
            for p in batch:
                self._frames.reject(
                    p.ticket.message, "inference_failed", f"{type(exc).__name__}: {exc}"
                )
            self._frames.finish(batch)
            return
        self._status.set("model_unavailable", False)
        now = time.monotonic()
        if self._updates is not None:
            oldest = min(p.ticket.message.received_at for p in batch)
            self._updates.observe(pred, count=len(batch), latency_s=now - oldest)
        results: list[Result] = []
        answered: list[tuple[str, str]] = []
        served: list[Pending] = []
        rejected: list[Pending] = []
        labels = pred.labels.tolist()
        confidences = pred.confidences.tolist()
        finite = pred.finite.tolist()
        unsure = self._triage(pred)
        ids = new_ids(len(batch))
        cases: list[Case] = []
        escalated: list[Pending] = []
        for i, (p, label, conf, ok) in enumerate(
            zip(batch, labels, confidences, finite, strict=True)
        ):
            if not ok:
                self._frames.reject(
                    p.ticket.message, "non_finite_output", "the model produced NaN or Inf"
                )
                rejected.append(p)
                continue
            self._seq += 1
            result = Result(
                id=ids[i],
                seq=self._seq,
                device=p.device,
                sensor=p.sensor,
                frame_seq=p.frame.seq,
                frame_ts=p.frame.ts,
                model=model.name,
                release=model.release,
                label=label,
                confidence=conf,
                source="edge",
                latency_ms=(now - p.ticket.message.received_at) * 1000.0,
            )
            if i in unsure:
                received = p.ticket.message.received_at
                cases.append(Case(result, p.key, p.frame.tensor, unsure[i], received))
                escalated.append(p)
                continue
            results.append(result)
            answered.append((p.key, result.id))
            served.append(p)
        if rejected:
            self._frames.finish(rejected)
        if cases:
            self._tasks.start(self._results.escalate(cases, escalated))
        if not results:
            return
        self._stats.results_out += len(results)
        for r in results:
            with contextlib.suppress(ValueError):  # a clock step could make one negative
                self._observe_latency_ms(r.latency_ms)
        self._results.put((results, answered, served))

    def _triage(self, pred: Prediction) -> dict[int, EdgeVerdict]:
        """Rows of this batch the escalation policy sends to the cloud, with their summaries."""
        if self._escalator is None or pred.scores is None:
            return {}
        model = self._served.model
        t = self._escalator.triage(model.name, pred.scores, model.output)
        return dict(zip(t.rows, t.verdicts, strict=True))

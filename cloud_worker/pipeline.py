"""One model's ordered answering pipeline: batches from its batcher, looked up and answered
in the order they were formed, a few in hand at once (docs/adr/0034-worker-pipeline-and-rows.md,
docs/adr/0035-worker-model-thread.md).

Stages, per batch: :meth:`ModelPipeline.admit` (the batcher's callback: a place among the
:data:`BATCHES_IN_FLIGHT`, and a turn after the batch before it), :meth:`ModelPipeline.answer`
(never lets a failure stop the pipeline), then one of two ways to look the cases up and call the
handler, and :meth:`~cloud_worker.answers.Decider.decide` with the outcome.

The two ways differ in where the store is read, and stay two: a plain-function handler runs on
a thread of its own, which looks the batch up right before the call (or collects the look-up
started on the store's reading thread while the model was busy), so a batch costs one
hand-over to that thread; a coroutine handler runs on the event loop, which must not wait on a
SQLite read, so its batch is looked up on the store's thread before its turn and only the
cases not answered before are stacked. One path for both would move a look-up across a turn
or onto the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Sequence

from cloud_worker.answers import Decider
from cloud_worker.caller import HandlerCaller
from cloud_worker.config import BatchingConfig
from cloud_worker.errors import StoreError
from cloud_worker.handler import Batch, Handler, Verdict
from cloud_worker.jobs import Job, Outcome, by_input_kind, prepare
from cloud_worker.stats import WorkerStats
from cloud_worker.store import Answer, HardExampleStore
from edgewise.serving.batcher import MicroBatcher

log = logging.getLogger(__name__)

BATCHES_IN_FLIGHT = 3
"""Handler batches of one model in hand at once: one in the handler, the others being looked up
and stacked, or queued on the handler's thread to start the moment the call before returns."""


class ModelPipeline:
    """The batcher of one model and the batches it formed, in hand until decided."""

    def __init__(
        self,
        model: str,
        handler: Handler,
        batching: BatchingConfig,
        *,
        store: HardExampleStore,
        stats: WorkerStats,
        decider: Decider,
        answering: set[asyncio.Task[None]],
        before_batch: Callable[[], None],
    ) -> None:
        self.model = model
        self.handler = handler
        self.caller = HandlerCaller(handler)
        self.store = store
        self.stats = stats
        self.decider = decider
        self.answering = answering
        """Tasks answering a batch (of every model: the worker waits for them to drain)."""
        self.before_batch = before_batch
        self.wait_when_idle = batching.wait_when_idle
        self.slots = asyncio.Semaphore(BATCHES_IN_FLIGHT)
        self.in_hand = 0
        """Batches admitted and not yet decided."""
        self.previous: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Set once the last batch admitted has handed its work to the handler."""
        self.previous.set_result(None)
        self.batcher: MicroBatcher[Job] = MicroBatcher(
            self.admit,
            max_batch_size=batching.max_batch_size,
            max_wait_s=batching.max_wait_ms / 1000.0,
            # An idle model takes a case at once; while it is busy cases gather.
            wait_if=None if batching.wait_when_idle else self.busy,
        )

    def busy(self) -> bool:
        """The model has a batch in hand (being answered)."""
        return self.in_hand > 0

    def close(self) -> None:
        self.caller.close()

    # ------------------------------------------------------------------ stages
    async def admit(self, jobs: list[Job]) -> None:
        """The batcher's callback: hand ``jobs`` to a task of its own, so the next batch is
        prepared while this one is in the handler (at most :data:`BATCHES_IN_FLIGHT` at a
        time). Batches reach the handler in the order the batcher formed them: each task hands
        its batch to the :class:`HandlerCaller` only after the task before it has (``turn``)."""
        self.before_batch()
        await self.slots.acquire()
        self.in_hand += 1
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        turn, self.previous = self.previous, mine
        # Another batch in hand: the model is busy, so this one's ids are looked up
        # meanwhile, on the store's reading thread (else on the model's, right before).
        ahead = self.in_hand > 1
        task = asyncio.create_task(self.answer(jobs, turn, mine, ahead))
        self.answering.add(task)
        task.add_done_callback(self.answering.discard)

    async def answer(
        self, jobs: list[Job], turn: asyncio.Future[None], mine: asyncio.Future[None], ahead: bool
    ) -> None:
        """Decide every case of ``jobs``; whatever fails, the pipeline goes on."""
        try:
            if self.caller.threaded:
                await self._on_thread(jobs, turn, mine, ahead)
            else:
                await self._on_loop(jobs, turn, mine)
        except Exception:  # never stop answering
            self.stats.failures["answer"] += 1
            log.exception("unexpected error answering %d escalations", len(jobs))
            for job in jobs:
                self.decider.case_done(job, None, None)
        finally:
            self.in_hand -= 1
            if self.in_hand == 0 and not self.wait_when_idle:
                # No batch in hand: the cases that gathered meanwhile go now.
                self.batcher.wake()
            if not mine.done():
                mine.set_result(None)
            self.slots.release()

    async def _on_thread(
        self, jobs: list[Job], turn: asyncio.Future[None], mine: asyncio.Future[None], ahead: bool
    ) -> None:
        """A plain-function handler: the cases answered before (the store) get that answer
        again, the rest go to the handler once it is this batch's ``turn`` (then ``mine`` is
        set). The look-up is started now on the store's reading thread when the model is busy
        with an earlier batch (``ahead``), else the handler's thread does it right before the
        call: one hand-over per batch either way."""
        model, handler = self.model, self.handler
        # Grouped and stacked here, before this batch's turn (while the one before it is
        # in the handler): the handler's thread only looks up (or collects) and calls.
        prepared = [prepare(model, group) for group in by_input_kind(jobs)]
        found = self.store.lookup_ahead([esc.id for esc, _ in jobs]) if ahead else None
        if not turn.done():
            await turn
        loop = asyncio.get_running_loop()
        work = self.caller.run(lambda: self._look_up_and_call(jobs, prepared, found, loop))
        mine.set_result(None)
        known, outcomes = await work
        self.decider.decide(model, handler, jobs, known, outcomes)

    async def _on_loop(
        self, jobs: list[Job], turn: asyncio.Future[None], mine: asyncio.Future[None]
    ) -> None:
        """A coroutine handler: looked up on the store's reading thread, then the cases not
        answered before go to the handler once it is this batch's ``turn``."""
        model = self.model
        known = await self._look_up(jobs)
        fresh = [j for j in jobs if j[0].id not in known] if known else jobs
        if not turn.done():
            await turn
        calls: list[tuple[list[Job], asyncio.Future[Sequence[Verdict]] | Exception]] = []
        for group, batch in (prepare(model, g) for g in by_input_kind(fresh)):
            call = batch if isinstance(batch, Exception) else self.caller.submit(batch)
            calls.append((group, call))
        mine.set_result(None)
        outcomes: list[Outcome] = []
        for group, call in calls:
            if isinstance(call, Exception):
                outcomes.append((group, call))
                continue
            try:
                outcomes.append((group, await call))
            except Exception as exc:  # a handler failure must not stop the worker
                outcomes.append((group, exc))
        self.decider.decide(model, self.handler, jobs, known, outcomes)

    async def _look_up(self, jobs: list[Job]) -> dict[str, Answer]:
        try:
            return await self.store.lookup([esc.id for esc, _ in jobs])
        except StoreError as exc:
            log.warning("cannot look up earlier answers (%s)", exc)
            return {}

    def _look_up_and_call(
        self,
        jobs: list[Job],
        prepared: list[tuple[list[Job], Batch | Exception]],
        found: concurrent.futures.Future[dict[str, Answer]] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[dict[str, Answer], list[Outcome]]:
        """On the handler's thread: the stored answers among ``jobs`` (``found``, looked up
        ahead, or looked up now), and the handler's verdicts (or its error) for each
        ``prepared`` group of the others (a group with cases answered before is stacked again
        without them). Touches no state of the worker's."""
        try:
            if found is not None:
                known = found.result()
            else:
                known = self.store.lookup_here([esc.id for esc, _ in jobs])
        except StoreError as exc:
            log.warning("cannot look up earlier answers (%s)", exc)
            known = {}
        outcomes: list[Outcome] = []
        for group, batch in prepared:
            if known:
                fresh = [j for j in group if j[0].id not in known]
                if not fresh:
                    continue
                if len(fresh) < len(group):
                    group, batch = prepare(self.model, fresh)
            if isinstance(batch, Exception):
                outcomes.append((group, batch))
                continue
            try:
                outcomes.append((group, self.handler.call_blocking(batch, loop)))
            except Exception as exc:  # a handler failure stops nothing else
                outcomes.append((group, exc))
        return known, outcomes

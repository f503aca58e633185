"""The cloud worker: answers escalations from edge nodes with a bigger model.

An escalation message holds one or more cases (docs/adr/0032-escalation-batches.md). Per message:
size cap, decode and validate (rejects counted, per message). Per case: drop it if expired (the
broker drops a whole message earlier when its MQTT 5 message expiry, the earliest deadline, has
passed; the payload's deadlines cover MQTT 3.1.1), answer a duplicate case id with the answer
already given (bounded in-memory cache, then the store), else queue it for its model's batcher:
the cases of concurrent messages become one model call. Once every case of a message is answered
(or expired, or its handler failed), one reply message with its verdicts goes to the node's reply
topic (MQTT 5 response topic and correlation data when the escalation came with them, always the
in-payload ``reply_to``/``corr``), and the answered cases are written to the hard-example store.
A message is acknowledged (in arrival order) only once its reply has been acknowledged by the
broker and its rows committed: a worker that dies leaves its unanswered work unacknowledged, and
the broker hands it out again.

Use::

    worker = Worker(WorkerConfig.load("worker.toml"))

    @worker.handler("digits", version="my-model-2")
    def classify(batch: Batch) -> list[Verdict]: ...

    async with worker:
        await stop.wait()
        await worker.drain()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Final, Self

import numpy as np

from cloud_worker.cache import BoundedCache
from cloud_worker.caller import HandlerCaller
from cloud_worker.config import WorkerConfig
from cloud_worker.errors import HandlerError, StoreError
from cloud_worker.handler import Batch, Handler, HandlerFn, Verdict, Verdicts
from cloud_worker.onnx_model import onnx_handler
from cloud_worker.presence import Presence
from cloud_worker.stats import WorkerStats
from cloud_worker.store import Answer, HardExampleStore, Row, example_row
from cloud_worker.telemetry import TelemetryReporter
from edgewise.mqtt import (
    ConnectInfo,
    Inbound,
    MqttError,
    MqttSession,
    PublishProperties,
    max_packet_for,
)
from edgewise.mqtt.properties import expiry_interval_s
from edgewise.serving.acks import InOrderAcker, Ticket
from edgewise.serving.batcher import MicroBatcher
from edgewise.serving.model import ServedModel
from schemas import (
    DTYPES,
    CaseVerdict,
    ContractError,
    Escalation,
    EscalationBatch,
    ReplyBatch,
    decode_escalations,
    encode_replies,
    log_text,
    validate_topic,
)

log = logging.getLogger(__name__)

BATCHES_IN_FLIGHT = 3
"""Handler batches of one model in hand at once: one in the handler, the others being looked up
and stacked, or queued on the handler's thread to start the moment the call before returns."""

PRESENCE_CHECK_S = 1.0
"""How often the presence's reasons are compared with what it last said."""

QUEUED_BATCHES_MAX = 4
"""Intake stops while a model has cases for this many full batches waiting to be batched, and
goes on as batches are formed: messages received meanwhile wait, undecoded, in arrival order,
and reading from the broker pauses (it resumes once they are taken and half of this is left).
Taking in everything the socket holds would otherwise keep the event loop on intake for as long
as the broker has messages queued (paho reads as many packets per call as replies are in
flight, a few hundred µs of decoding and bookkeeping each), while the handler idles for want
of its next batch (docs/adr/0035-worker-model-thread.md)."""


class _Message:
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


_Job = tuple[Escalation, _Message]
"""One case of a message, as it waits for its model's batch."""

_Outcome = tuple[list[_Job], Sequence[Verdict] | Exception]
"""A group of cases sharing an input kind, and the handler's verdicts for them or its error."""

_NO_COPIES: Final[list[_Job]] = []
"""``Worker._in_progress`` value of a case id no other message has sent meanwhile (shared,
never appended to)."""


@functools.lru_cache(maxsize=4096)
def _is_reply_topic(topic: str, node: str) -> bool:
    """A worker replies only to ``.../{node}/reply`` of the node that asked: an escalation cannot
    make it publish anywhere else on the cloud broker. (Asked twice per message, for the same
    few nodes: remembered.)"""
    try:
        validate_topic(topic)
    except ContractError:
        return False
    return topic.endswith(f"/{node}/reply")


class Worker:
    """A cloud worker bound to one broker; ``async with Worker(config) as worker``."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.topics = config.topics()
        self.limits = config.limits()
        self.stats = WorkerStats()
        self._handlers: dict[str, Handler] = {}
        self._models: list[ServedModel] = []
        self._answered: BoundedCache[Answer] = BoundedCache(config.answered_cache_entries)
        self._in_progress: dict[str, list[_Job]] = {}
        """Case ids between intake and answer -> the copies of them other messages sent
        meanwhile (answered together with the first)."""
        self._callers: dict[str, HandlerCaller] = {}
        self._pause_at = QUEUED_BATCHES_MAX * config.batching.max_batch_size
        self._deferred: deque[tuple[Inbound, Ticket]] = deque()
        """Messages received while a model was saturated, in arrival order (not decoded)."""
        self._settling: set[_Message] = set()
        """Messages replied to, waiting for their reply's PUBACK and their rows' commits."""
        self._all_settled = asyncio.Event()
        self._all_settled.set()
        self._answering: set[asyncio.Task[None]] = set()
        self._batchers: dict[str, MicroBatcher[_Job]] = {}
        self._draining = False
        self._said_offline = False
        self._subscribed = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self.subscription = ""
        self.store = HardExampleStore(config.store)
        self.boot_id = uuid.uuid4().hex[:12]
        self.presence_topic = self.topics.worker_status(self.worker_id)
        """Retained: ``online`` while this worker is connected and taking escalations,
        ``degraded`` and why while it serves with a fault (``client_id_conflict``), else
        ``offline`` (its will says so if it dies); nodes count who is not offline
        (docs/adr/0074-cloud-availability.md, docs/adr/0079-worker-status.md)."""
        self.presence = Presence(self.presence_topic, self.worker_id, self.boot_id)
        self.session = MqttSession(
            config.mqtt,
            client_id=f"edgewise-worker-{self.worker_id}",
            on_message=self._on_message,
            on_connect=self._say_online,
            will=self.presence.will(),
            keep_properties=True,
            # The broker drops what no escalation can be (issue 16 point 8, ADR 0077).
            max_packet_bytes=max_packet_for(config.max_payload_bytes),
        )
        self.presence.session = self.session
        self.telemetry = TelemetryReporter(
            self.topics.worker_telemetry(self.worker_id), self.stats, self.session, self.presence
        )
        self._acker = InOrderAcker(self.session)

    # ------------------------------------------------------------------ handlers
    def handler(self, model: str, *, version: str = "custom") -> Callable[[HandlerFn], HandlerFn]:
        """Register ``fn`` as the answer for escalations of ``model`` (before entering)."""

        def register(fn: HandlerFn) -> HandlerFn:
            self._handlers[model] = Handler(model, version, fn)
            return fn

        return register

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Self:
        for name, cfg in self.config.models.items():
            if name not in self._handlers:
                handler, served = onnx_handler(name, cfg)
                self._handlers[name] = handler
                self._models.append(served)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._close_models)
            await stack.enter_async_context(self.store)
            await stack.enter_async_context(self.session)
            tasks = await stack.enter_async_context(asyncio.TaskGroup())
            self._tasks = tasks
            loops = []
            for name, handler in self._handlers.items():
                self._callers[name] = HandlerCaller(handler)
                batching = self.config.batching
                process, busy = self._make_process(name, functools.partial(self._model_free, name))
                batcher: MicroBatcher[_Job] = MicroBatcher(
                    process,
                    max_batch_size=batching.max_batch_size,
                    max_wait_s=batching.max_wait_ms / 1000.0,
                    # An idle model takes a case at once; while it is busy cases gather.
                    wait_if=None if batching.wait_when_idle else busy,
                )
                self._batchers[name] = batcher
                loops.append(tasks.create_task(batcher.run(), name=f"worker-batcher-{name}"))
            stack.callback(lambda: [t.cancel() for t in loops])
            await self._subscribe()
            loops.append(tasks.create_task(self._report(), name="worker-report"))
            self._stack = stack.pop_all()
        log.info(
            "worker %s answering %s on %s",
            self.worker_id,
            ", ".join(f"{h.model} ({h.version})" for h in self._handlers.values()),
            self.subscription,
        )
        return self

    async def _subscribe(self) -> None:
        # The subscription depends on the protocol the broker speaks: wait for it, however long
        # (a worker may start before its broker); the session retries with backoff and logs why.
        if not self.session.connected:
            mqtt = self.config.mqtt
            log.info("waiting for the broker at %s:%d before subscribing", mqtt.host, mqtt.port)
        await self.session.wait_connected()
        if self.session.protocol == "5":
            self.subscription = self.topics.escalations_filter(self.config.group)
        else:
            self.subscription = self.topics.escalations_filter(None)
            log.warning(
                "the broker speaks MQTT 3.1.1 only: subscribing to %s without a shared"
                " subscription, so every worker on this broker receives every escalation (run"
                " one worker, or use an MQTT 5 broker to split the load)",
                self.subscription,
            )
        self.session.subscribe(self.subscription, qos=1)
        # After the SUBSCRIBE on the same connection: a node that sees this worker online
        # sees it once the broker has its subscription.
        self._subscribed = True
        self._announce()

    def _close_models(self) -> None:
        for c in self._callers.values():
            c.close()
        for m in self._models:
            m.close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            if not self._said_offline:
                await self._say_offline()
            await self._stack.__aexit__(None, None, None)

    # ------------------------------------------------------------------ presence
    async def _say_online(self, info: ConnectInfo) -> None:
        if self._subscribed:  # a reconnect (the first connect announces after subscribing)
            self._announce()

    def _announce(self) -> None:
        if self._draining:
            return
        self.presence.announce()

    async def _say_offline(self) -> None:
        self._said_offline = True
        await self.presence.say_offline()

    async def _report(self) -> None:
        """Say the presence again when its reasons change (the conflict clears on its own,
        ADR 0073), and publish telemetry every ``telemetry_interval_s`` (0: none)."""
        interval = self.config.telemetry_interval_s
        next_window = time.monotonic() + interval
        while True:
            await asyncio.sleep(min(PRESENCE_CHECK_S, interval or PRESENCE_CHECK_S))
            if not self._draining:
                self.presence.refresh()
            now = time.monotonic()
            if interval and now >= next_window:
                next_window = now + interval
                self.telemetry.publish()

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop taking escalations, finish (reply, store, acknowledge) the ones in hand.

        Escalations not yet read stay unacknowledged in the worker's session; those in hand when
        the time runs out are not acknowledged either: the broker hands both out again (to this
        worker's next run, as its session persists), unless they expire first.
        """
        # New escalations are left unacknowledged from now on; reading goes on, since the
        # PUBACKs of replies in flight must still come in.
        self._draining = True
        self._take_deferred()  # received before: in hand
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        finished = True
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._finish_in_hand())
        except TimeoutError:
            log.warning(
                "drain timed out after %.1f s; unanswered work is handed back (%s)",
                timeout_s,
                self.describe(),
            )
            finished = False
        await self._say_offline()
        return finished

    def describe(self) -> dict[str, object]:
        """Where the worker's work stands (for an operator chasing a stall)."""
        return {
            "connected": self.session.connected,
            "client_id_conflict": self.session.client_id_conflict,
            "waiting_for_a_batch": {k: len(b) for k, b in self._batchers.items()},
            "held_back_messages": len(self._deferred),
            "in_progress": len(self._in_progress),
            "in_handler_batches": len(self._answering),
            "replying": len(self._settling),
            "rows_to_commit": self.store.queued,
            "unacknowledged": self._acker.outstanding,
        }

    async def _finish_in_hand(self) -> None:
        for b in self._batchers.values():
            await b.wait_idle()
        while self._answering or self._settling:
            if self._answering:
                await asyncio.gather(*self._answering, return_exceptions=True)
            else:
                await self._all_settled.wait()
        await self.store.flush()

    # ------------------------------------------------------------------ intake
    def _on_message(self, msg: Inbound) -> None:
        if self._draining:
            self.stats.ignored_draining += 1
            return
        self.stats.received += 1
        ticket = self._acker.track(msg)
        if self._deferred or self._saturated():
            self._deferred.append((msg, ticket))
            self.session.pause_reading()
            return
        self._take(msg, ticket)

    def _saturated(self) -> bool:
        """Some model has :data:`QUEUED_BATCHES_MAX` batches' worth of cases waiting."""
        pause_at = self._pause_at
        return any(len(b) >= pause_at for b in self._batchers.values())

    def _take_deferred(self) -> None:
        """Take the messages held back, in order, until a model is saturated again; resume
        reading once none is held back and half of the limit is left."""
        deferred = self._deferred
        while deferred and (self._draining or not self._saturated()):
            self._take(*deferred.popleft())
        half = self._pause_at // 2
        if (
            not deferred
            and self.session.reading_paused
            and all(len(b) <= half for b in self._batchers.values())
        ):
            self.session.resume_reading()

    def _take(self, msg: Inbound, ticket: Ticket) -> None:
        try:
            batch = decode_escalations(msg.payload, self.limits)
            if msg.topic != self.topics.escalations(batch.model):
                raise ContractError("bad_topic", f"escalation for {batch.model!r} on {msg.topic!r}")
            if batch.reply_to is not None and not _is_reply_topic(batch.reply_to, batch.node):
                raise ContractError("bad_topic", f"reply_to {batch.reply_to!r} is not node's reply")
        except ContractError as exc:
            self.stats.rejects[exc.reason] += 1
            log.debug("rejected escalation on %s: %s", log_text(msg.topic, 128), log_text(str(exc)))
            self._acker.finish(ticket)
            return
        except Exception as exc:  # a bug must not hold back every later acknowledgement
            self.stats.failures["intake"] += 1
            self.stats.rejects["internal_error"] += 1
            log.error("escalation on %r rejected: %s: %s", msg.topic[:128], type(exc).__name__, exc)
            self._acker.finish(ticket)
            return
        if batch.model not in self._batchers:
            self.stats.rejects["no_handler"] += 1
            self._acker.finish(ticket)
            return
        cases = batch.cases_view()
        self.stats.cases += len(cases)
        parent = _Message(batch, msg, ticket)
        now = time.time()
        in_progress = self._in_progress
        cached = self._answered.get
        fresh: list[_Job] = []
        for esc in cases:
            deadline = esc.deadline
            if deadline is not None and now > deadline:  # esc.expired(now)
                self.stats.expired += 1
                continue
            id_ = esc.id
            copies = in_progress.get(id_)
            if copies is not None:  # answered together with the first copy
                self.stats.duplicates += 1
                parent.waiting += 1
                if copies is _NO_COPIES:
                    in_progress[id_] = [(esc, parent)]
                else:
                    copies.append((esc, parent))
                continue
            answer = cached(id_)
            if answer is not None:
                self.stats.duplicates += 1
                parent.answered.append((esc, answer))
                continue
            in_progress[id_] = _NO_COPIES
            fresh.append((esc, parent))
        parent.waiting += len(fresh)
        try:
            self._batchers[batch.model].add_many(fresh)
        except Exception as exc:  # never answered: forget them, settle the message without
            self.stats.failures["intake"] += 1
            log.error("%d cases not queued: %s: %s", len(fresh), type(exc).__name__, exc)
            for esc, _ in fresh:
                in_progress.pop(esc.id, None)
            parent.waiting -= len(fresh)
        if parent.waiting == 0:
            self._settle(parent)

    # ------------------------------------------------------------------ answering
    def _model_free(self, model: str) -> None:
        """``model`` has no batch in hand: the cases that gathered meanwhile go now."""
        if not self.config.batching.wait_when_idle:
            self._batchers[model].wake()

    def _make_process(
        self, model: str, idle: Callable[[], None]
    ) -> tuple[Callable[[list[_Job]], Any], Callable[[], bool]]:
        """The batcher's callback, and whether the model has a batch in hand (being answered);
        ``idle`` is called whenever the last batch in hand is done.

        The callback hands each batch to a task of its own, so the next batch is prepared
        while this one is in the handler (at most :data:`BATCHES_IN_FLIGHT` at a time). Batches
        reach the handler in the order the batcher formed them: each task hands its batch to
        the :class:`HandlerCaller` only after the task before it has (``turn``)."""
        slots = asyncio.Semaphore(BATCHES_IN_FLIGHT)
        in_hand = 0
        loop = asyncio.get_running_loop()
        previous: list[asyncio.Future[None]] = [loop.create_future()]
        previous[0].set_result(None)

        async def answer(
            jobs: list[_Job], turn: asyncio.Future[None], mine: asyncio.Future[None], ahead: bool
        ) -> None:
            nonlocal in_hand
            try:
                await self._answer(model, jobs, turn, mine, ahead=ahead)
            except Exception:  # never stop answering
                self.stats.failures["answer"] += 1
                log.exception("unexpected error answering %d escalations", len(jobs))
                for job in jobs:
                    self._case_done(job, None, None)
            finally:
                in_hand -= 1
                if in_hand == 0:
                    idle()
                if not mine.done():
                    mine.set_result(None)
                slots.release()

        async def process(jobs: list[_Job]) -> None:
            nonlocal in_hand
            if self._deferred or self.session.reading_paused:
                self._take_deferred()
            await slots.acquire()
            in_hand += 1
            mine = loop.create_future()
            turn, previous[0] = previous[0], mine
            # Another batch in hand: the model is busy, so this one's ids are looked up
            # meanwhile, on the store's reading thread (else on the model's, right before).
            ahead = in_hand > 1
            task = asyncio.create_task(answer(jobs, turn, mine, ahead))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

        return process, lambda: in_hand > 0

    async def _answer(
        self,
        model: str,
        jobs: list[_Job],
        turn: asyncio.Future[None],
        mine: asyncio.Future[None],
        *,
        ahead: bool = False,
    ) -> None:
        """Decide every case of ``jobs``: those answered before (the store) get that answer
        again, the rest go to the handler once it is this batch's ``turn`` (then ``mine`` is
        set). For a thread handler the look-up is started now on the store's reading thread
        when the model is busy with an earlier batch (``ahead``), else the handler's thread
        does it right before the call: one hand-over per batch either way; a coroutine handler
        gets them after a look-up on the store's reading thread."""
        handler = self._handlers[model]
        caller = self._callers[model]
        outcomes: list[_Outcome] = []
        if caller.threaded:
            # Grouped and stacked here, before this batch's turn (while the one before it is
            # in the handler): the handler's thread only looks up (or collects) and calls.
            prepared = [_prepare(model, group) for group in _by_input_kind(jobs)]
            found = self.store.lookup_ahead([esc.id for esc, _ in jobs]) if ahead else None
            if not turn.done():
                await turn
            loop = asyncio.get_running_loop()
            work = caller.run(
                lambda: self._look_up_and_call(model, handler, jobs, prepared, found, loop)
            )
            mine.set_result(None)
            known, outcomes = await work
        else:
            known = await self._look_up(jobs)
            fresh = [j for j in jobs if j[0].id not in known] if known else jobs
            if not turn.done():
                await turn
            calls: list[tuple[list[_Job], asyncio.Future[Sequence[Verdict]] | Exception]] = []
            for group, batch in (_prepare(model, g) for g in _by_input_kind(fresh)):
                call = batch if isinstance(batch, Exception) else caller.submit(batch)
                calls.append((group, call))
            mine.set_result(None)
            for group, call in calls:
                if isinstance(call, Exception):
                    outcomes.append((group, call))
                    continue
                try:
                    outcomes.append((group, await call))
                except Exception as exc:  # a handler failure must not stop the worker
                    outcomes.append((group, exc))
        self._decide(model, handler, jobs, known, outcomes)

    async def _look_up(self, jobs: list[_Job]) -> dict[str, Answer]:
        try:
            return await self.store.lookup([esc.id for esc, _ in jobs])
        except StoreError as exc:
            log.warning("cannot look up earlier answers (%s)", exc)
            return {}

    def _look_up_and_call(
        self,
        model: str,
        handler: Handler,
        jobs: list[_Job],
        prepared: list[tuple[list[_Job], Batch | Exception]],
        found: concurrent.futures.Future[dict[str, Answer]] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[dict[str, Answer], list[_Outcome]]:
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
        outcomes: list[_Outcome] = []
        for group, batch in prepared:
            if known:
                fresh = [j for j in group if j[0].id not in known]
                if not fresh:
                    continue
                if len(fresh) < len(group):
                    group, batch = _prepare(model, fresh)
            if isinstance(batch, Exception):
                outcomes.append((group, batch))
                continue
            try:
                outcomes.append((group, handler.call_blocking(batch, loop)))
            except Exception as exc:  # a handler failure stops nothing else
                outcomes.append((group, exc))
        return known, outcomes

    def _decide(
        self,
        model: str,
        handler: Handler,
        jobs: list[_Job],
        known: dict[str, Answer],
        outcomes: list[_Outcome],
    ) -> None:
        """Settle ``jobs``: the ``known`` answers, then each group's verdicts or failure."""
        if known:
            for job in jobs:
                found = known.get(job[0].id)
                if found is not None:
                    self.stats.duplicates += 1
                    self._answered.put(job[0].id, found)
                    self._case_done(job, found, None)
        decided: list[tuple[_Job, Answer | None]] = []
        rows: list[Row] = []
        for group, out in outcomes:
            answers: Sequence[Answer | None] = [None] * len(group)
            if isinstance(out, Exception):
                self._handler_failed(model, group, out)
            else:
                try:
                    answers = self._answers_of(handler, out)
                except Exception as exc:  # verdicts of the wrong type
                    self._handler_failed(model, group, exc)
                else:
                    self.stats.batches += 1
                    self.stats.handled += len(group)
                    self.stats.answered += len(group)
                    self._answered.put_many([esc.id for esc, _ in group], answers)
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
            self._case_done(job, answer, stored)

    def _handler_failed(self, model: str, group: list[_Job], exc: Exception) -> None:
        self.stats.handler_errors += 1
        log.error("handler for %r failed on %d inputs: %s", model, len(group), exc)

    def _rows(self, group: list[_Job], answers: Sequence[Answer]) -> list[Row]:
        """The hard-example rows of a group's answered cases."""
        rows: list[Row] = []
        shapes: dict[tuple[int, ...], str] = {}  # the JSON of each shape, once
        now = time.time()
        for (esc, parent), answer in zip(group, answers, strict=True):
            key = tuple(esc.shape)
            text = shapes.get(key)
            if text is None:
                text = shapes[key] = json.dumps(esc.shape)
            rows.append(
                example_row(
                    esc, answer, received_at=parent.msg.received_at, answered_at=now,
                    shape_text=text,
                )
            )  # fmt: skip
        return rows

    def _case_done(
        self, job: _Job, answer: Answer | None, stored: asyncio.Future[Any] | None
    ) -> None:
        """``job``'s case is decided (``answer`` None: no answer); so are the copies of it that
        came in other messages meanwhile."""
        esc, parent = job
        copies = self._in_progress.pop(esc.id, None)
        if copies is None:
            return  # decided already
        if stored is not None and (not parent.stored or parent.stored[-1] is not stored):
            parent.stored.append(stored)  # the copies' messages do not wait for this row
        for esc, parent in (job, *copies):
            if answer is not None:
                parent.answered.append((esc, answer))
            parent.waiting -= 1
            if parent.waiting == 0:
                self._settle(parent)

    def _answers_of(self, handler: Handler, verdicts: Sequence[Verdict]) -> list[Answer]:
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

    def _settle(self, message: _Message) -> None:
        """None of ``message``'s cases waits any more: reply now, acknowledge once the reply
        has its PUBACK and the message's rows are committed (callbacks on those futures, not a
        task per message: a task's creation and steps cost more than the rest of this). A reply
        that cannot be made or sent (a bug, a fault) leaves the cases unanswered (the node
        falls back at their deadlines); the message is acknowledged all the same."""
        try:
            send, verdicts = self._reply(message)
        except Exception as exc:
            self.stats.failures["reply"] += 1
            self.stats.reply_failures += 1
            log.error(
                "reply to %s not sent (%d cases unanswered): %s: %s",
                message.batch.node,
                len(message.answered),
                type(exc).__name__,
                exc,
            )
            send, verdicts = None, 0
        # A commit can cover several of the message's groups: each future once.
        message.stored = list({id(f): f for f in message.stored}.values())
        waits = message.stored if send is None else [*message.stored, send]
        message.unsettled = len(waits)
        if not waits:
            self._acknowledge(message, send, verdicts)
            return
        self._settling.add(message)
        self._all_settled.clear()
        done = functools.partial(self._settle_step, message, send, verdicts)
        for fut in waits:
            fut.add_done_callback(done)

    def _settle_step(
        self,
        message: _Message,
        send: asyncio.Future[None] | None,
        verdicts: int,
        _done: asyncio.Future[Any],
    ) -> None:
        message.unsettled -= 1
        if message.unsettled:
            return
        self._settling.discard(message)
        if not self._settling:
            self._all_settled.set()
        self._acknowledge(message, send, verdicts)

    def _reply(self, message: _Message) -> tuple[asyncio.Future[None] | None, int]:
        """Publish the reply with the verdicts of ``message``'s answered cases that are still
        in time; returns its PUBACK future (None: nothing to send) and its verdict count."""
        batch = message.batch
        if not batch.wants_reply:
            self.stats.uploads += len(message.answered)
            return None, 0
        now = time.time()
        verdicts: list[CaseVerdict] = []
        for esc, answer in message.answered:
            deadline = esc.deadline
            if deadline is not None and now > deadline:  # esc.expired(now)
                self.stats.expired += 1
                continue
            assert esc.corr is not None
            verdicts.append(
                CaseVerdict(esc.id, esc.corr, answer.label, answer.confidence, answer.model)
            )
        if not verdicts:
            return None, 0
        return self._send_reply(message, verdicts), len(verdicts)

    def _acknowledge(
        self, message: _Message, send: asyncio.Future[None] | None, verdicts: int
    ) -> None:
        """The reply's PUBACK and the rows' commits are in (every future is done): count how
        they went and acknowledge the escalation, unless the connection dropped first."""
        ok = True
        for stored in message.stored:
            if stored.cancelled():
                return  # the store shut down under it: the broker hands it out again
            exc = stored.exception()
            if exc is not None:
                self.stats.store_errors += 1
                log.error("hard examples not stored: %s", exc)
        if send is not None:
            if send.cancelled():
                return
            if send.exception() is not None:
                ok = False
                self.stats.reply_failures += 1
            else:
                self.stats.replies += 1
                self.stats.verdicts += verdicts
        if ok or self.session.connected:
            # Delivered, or refused for good on a live connection (retrying cannot help).
            self._acker.finish(message.ticket)
        # else: the connection dropped; the broker redelivers the escalation on the next one.

    def _send_reply(self, message: _Message, verdicts: list[CaseVerdict]) -> asyncio.Future[None]:
        batch = message.batch
        assert batch.reply_to is not None and batch.corr is not None
        reply = ReplyBatch(
            node=batch.node,
            corr=batch.corr,
            worker=self.worker_id,
            ts=time.time(),
            verdicts=verdicts,
        )
        topic = batch.reply_to
        props: PublishProperties | None = None
        if self.session.protocol == "5":
            inbound = message.msg.properties
            corr = batch.corr.encode()
            if inbound is not None:
                corr = getattr(inbound, "CorrelationData", None) or corr
                response_topic = getattr(inbound, "ResponseTopic", None)
                if isinstance(response_topic, str) and _is_reply_topic(response_topic, batch.node):
                    topic = response_topic
            deadlines = [e.deadline for e, _ in message.answered if e.deadline is not None]
            # Clamped to what the wire carries, whatever deadline the escalation named.
            expiry = expiry_interval_s(max(deadlines) - time.time()) if deadlines else None
            props = PublishProperties(correlation_data=corr, message_expiry_interval_s=expiry)
        payload = encode_replies(reply)
        try:
            return self.session.publish_nowait(topic, payload, qos=1, properties=props)
        except MqttError as exc:  # pragma: no cover - publish_nowait reports through the future
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
            return fut


def _by_input_kind(jobs: list[_Job]) -> list[list[_Job]]:
    """``jobs`` split by input dtype and shape (one group in the usual case), order kept."""
    if not jobs:
        return []
    first = jobs[0][0]
    dtype, shape = first.dtype, first.shape
    if all(esc.dtype == dtype and esc.shape == shape for esc, _ in jobs):
        return [jobs]
    groups: dict[tuple[str, tuple[int, ...]], list[_Job]] = defaultdict(list)
    for job in jobs:
        groups[(job[0].dtype, tuple(job[0].shape))].append(job)
    return list(groups.values())


def _prepare(model: str, group: list[_Job]) -> tuple[list[_Job], Batch | Exception]:
    """``group`` (one input kind) and its handler batch, or why it could not be made."""
    try:
        return group, Batch(model, _stack(group), [esc for esc, _ in group])
    except Exception as exc:  # a bad group must not stop the others
        return group, exc


def _stack(group: list[_Job]) -> np.ndarray:
    """The group's inputs (one dtype and shape, checked when their message was decoded) as one
    writable ``[N, *shape]`` array (one copy of the bytes)."""
    first = group[0][0]
    data = bytearray().join([esc.data for esc, _ in group])
    return np.frombuffer(data, dtype=DTYPES[first.dtype]).reshape(len(group), *first.shape)

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
import contextlib
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_worker.cache import BoundedCache
from cloud_worker.config import WorkerConfig
from cloud_worker.errors import HandlerError, StoreError
from cloud_worker.handler import Batch, Handler, HandlerFn, Verdict
from cloud_worker.onnx_model import onnx_handler
from cloud_worker.store import Answer, HardExampleStore, Row, example_row
from edge_node.acks import InOrderAcker, Ticket
from edge_node.batcher import MicroBatcher
from edge_node.model import ServedModel
from mqtt_session import Inbound, MqttError, MqttSession
from schemas import (
    DTYPES,
    CaseVerdict,
    ContractError,
    Escalation,
    EscalationBatch,
    ReplyBatch,
    decode_escalations,
    encode_replies,
    validate_topic,
)

log = logging.getLogger(__name__)

BATCHES_IN_FLIGHT = 2
"""Handler batches of one model in hand at once: one in the handler, the next being prepared."""


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

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())


@dataclass(slots=True, eq=False)
class _Message:
    """One escalation message in hand: settled (replied to, stored, acknowledged) once none of
    its cases is waiting any more."""

    batch: EscalationBatch
    msg: Inbound
    ticket: Ticket
    waiting: int = 0
    answered: list[tuple[Escalation, Answer]] = field(default_factory=list)
    stored: list[asyncio.Future[Any]] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Job:
    """One case of a message."""

    esc: Escalation
    parent: _Message
    answer: Answer | None = None


def _is_reply_topic(topic: str, node: str) -> bool:
    """A worker replies only to ``.../{node}/reply`` of the node that asked: an escalation cannot
    make it publish anywhere else on the cloud broker."""
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
        self._settling: set[asyncio.Task[None]] = set()
        self._answering: set[asyncio.Task[None]] = set()
        self._batchers: dict[str, MicroBatcher[_Job]] = {}
        self._draining = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self.subscription = ""
        self.store = HardExampleStore(config.store)
        self.session = MqttSession(
            config.mqtt,
            client_id=f"edgewise-worker-{self.worker_id}",
            on_message=self._on_message,
            keep_properties=True,
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
            for name in self._handlers:
                batcher: MicroBatcher[_Job] = MicroBatcher(
                    self._make_process(name),
                    max_batch_size=self.config.batching.max_batch_size,
                    max_wait_s=self.config.batching.max_wait_ms / 1000.0,
                )
                self._batchers[name] = batcher
                loops.append(tasks.create_task(batcher.run(), name=f"worker-batcher-{name}"))
            stack.callback(lambda: [t.cancel() for t in loops])
            await self._subscribe()
            self._stack = stack.pop_all()
        log.info(
            "worker %s answering %s on %s",
            self.worker_id,
            ", ".join(f"{h.model} ({h.version})" for h in self._handlers.values()),
            self.subscription,
        )
        return self

    async def _subscribe(self) -> None:
        await self.session.wait_connected(self.config.mqtt.connect_timeout_s)
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

    def _close_models(self) -> None:
        for m in self._models:
            m.close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            await self._stack.__aexit__(None, None, None)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop taking escalations, finish (reply, store, acknowledge) the ones in hand.

        Escalations not yet read stay unacknowledged in the worker's session; those in hand when
        the time runs out are not acknowledged either: the broker hands both out again (to this
        worker's next run, as its session persists), unless they expire first.
        """
        # New escalations are left unacknowledged from now on; reading goes on, since the
        # PUBACKs of replies in flight must still come in.
        self._draining = True
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._finish_in_hand())
        except TimeoutError:
            log.warning(
                "drain timed out after %.1f s; unanswered work is handed back (%s)",
                timeout_s,
                self.describe(),
            )
            return False
        return True

    def describe(self) -> dict[str, object]:
        """Where the worker's work stands (for an operator chasing a stall)."""
        return {
            "connected": self.session.connected,
            "waiting_for_a_batch": {k: len(b) for k, b in self._batchers.items()},
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
            await asyncio.gather(*self._answering, *self._settling, return_exceptions=True)
        await self.store.flush()

    # ------------------------------------------------------------------ intake
    def _on_message(self, msg: Inbound) -> None:
        if self._draining:
            self.stats.ignored_draining += 1
            return
        self.stats.received += 1
        ticket = self._acker.track(msg)
        try:
            batch = decode_escalations(msg.payload, self.limits)
            if msg.topic != self.topics.escalations(batch.model):
                raise ContractError("bad_topic", f"escalation for {batch.model!r} on {msg.topic!r}")
            if batch.reply_to is not None and not _is_reply_topic(batch.reply_to, batch.node):
                raise ContractError("bad_topic", f"reply_to {batch.reply_to!r} is not node's reply")
        except ContractError as exc:
            self.stats.rejects[exc.reason] += 1
            log.debug("rejected escalation on %r: %s", msg.topic[:128], exc)
            self._acker.finish(ticket)
            return
        if batch.model not in self._batchers:
            self.stats.rejects["no_handler"] += 1
            self._acker.finish(ticket)
            return
        self.stats.cases += len(batch.cases)
        parent = _Message(batch, msg, ticket)
        batcher = self._batchers[batch.model]
        now = time.time()
        in_progress = self._in_progress
        answered = self._answered
        fresh: list[_Job] = []
        for esc in batch.cases_view():
            if esc.deadline is not None and now > esc.deadline:  # esc.expired(now)
                self.stats.expired += 1
                continue
            job = _Job(esc, parent)
            waiting = in_progress.get(esc.id)
            if waiting is not None:
                self.stats.duplicates += 1
                parent.waiting += 1
                waiting.append(job)  # answered together with the first copy
                continue
            cached = answered.get(esc.id) if answered else None
            if cached is not None:
                self.stats.duplicates += 1
                parent.answered.append((esc, cached))
                continue
            in_progress[esc.id] = [job]
            fresh.append(job)
        parent.waiting += len(fresh)
        batcher.add_many(fresh)
        if parent.waiting == 0:
            self._settle(parent)

    # ------------------------------------------------------------------ answering
    def _make_process(self, model: str) -> Callable[[list[_Job]], Any]:
        """The batcher's callback: hands each batch to a task of its own, so the next batch
        is looked up and stacked while this one is in the handler (at most
        :data:`BATCHES_IN_FLIGHT` at a time; the handler itself is called for one batch at a
        time, in order)."""
        slots = asyncio.Semaphore(BATCHES_IN_FLIGHT)
        calling = asyncio.Lock()

        async def answer(jobs: list[_Job]) -> None:
            try:
                await self._answer(model, jobs, calling)
            except Exception:  # never stop answering
                log.exception("unexpected error answering %d escalations", len(jobs))
                for j in jobs:
                    self._case_done(j, None, None)
            finally:
                slots.release()

        async def process(jobs: list[_Job]) -> None:
            await slots.acquire()
            task = asyncio.create_task(answer(jobs))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

        return process

    async def _answer(self, model: str, jobs: list[_Job], calling: asyncio.Lock) -> None:
        handler = self._handlers[model]
        try:
            known = await self.store.lookup([j.esc.id for j in jobs])
        except StoreError as exc:
            log.warning("cannot look up earlier answers (%s)", exc)
            known = {}
        fresh: list[_Job] = []
        for j in jobs:
            found = known.get(j.esc.id)
            if found is not None:
                self.stats.duplicates += 1
                j.answer = found
                self._answered.put(j.esc.id, found)
            else:
                fresh.append(j)
        for group in _by_input_kind(fresh):
            try:
                inputs = _stack(group)
                async with calling:
                    verdicts = await handler(Batch(model, inputs, [j.esc for j in group]))
                answers = self._answers_of(handler, verdicts)
            except Exception as exc:  # a handler failure must not stop the worker
                self.stats.handler_errors += 1
                log.error("handler for %r failed on %d inputs: %s", model, len(group), exc)
                continue
            self.stats.batches += 1
            self.stats.handled += len(group)
            for j, a in zip(group, answers, strict=True):
                j.answer = a
        rows: list[Row] = []
        shapes: dict[tuple[int, ...], str] = {}  # the JSON of each shape, once
        now = time.time()
        for j in fresh:
            if j.answer is not None:
                esc = j.esc
                self.stats.answered += 1
                self._answered.put(esc.id, j.answer)
                key = tuple(esc.shape)
                text = shapes.get(key)
                if text is None:
                    text = shapes[key] = json.dumps(esc.shape)
                received = j.parent.msg.received_at
                rows.append(
                    example_row(
                        esc, j.answer, received_at=received, answered_at=now, shape_text=text
                    )
                )
        stored = self.store.add_many(rows) if rows else None
        for j in jobs:
            # No answer (the handler failed): the case is left out of the reply, so the node
            # falls back at its deadline, and its message is still acknowledged, so the broker
            # does not hand the same failing input out again and again.
            self._case_done(j, j.answer, stored)

    def _case_done(
        self, job: _Job, answer: Answer | None, stored: asyncio.Future[Any] | None
    ) -> None:
        """``job``'s case is decided (``answer`` None: no answer); so are the copies of it that
        came in other messages meanwhile."""
        copies = self._in_progress.pop(job.esc.id, None)
        if copies is None:
            return  # decided already
        for copy in copies:
            parent = copy.parent
            if answer is not None:
                parent.answered.append((copy.esc, answer))
            if stored is not None and copy is job:
                parent.stored.append(stored)
            parent.waiting -= 1
            if parent.waiting == 0:
                self._settle(parent)

    def _answers_of(self, handler: Handler, verdicts: list[Verdict]) -> list[Answer]:
        """The handler's verdicts as answers, confidence clamped to 0..1 (NaN: 0)."""
        version, worker = handler.version, self.worker_id
        answers = []
        for v in verdicts:
            if not isinstance(v, Verdict):
                raise HandlerError(f"handler for {handler.model!r} returned {type(v).__name__}")
            c = float(v.confidence)
            confidence = 1.0 if c > 1.0 else c if c >= 0.0 else 0.0
            answers.append(Answer(int(v.label), confidence, version, worker))
        return answers

    def _settle(self, message: _Message) -> None:
        task = asyncio.create_task(self._reply_and_ack(message))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _reply_and_ack(self, message: _Message) -> None:
        batch = message.batch
        now = time.time()
        ok = True
        send: asyncio.Future[None] | None = None
        verdicts: list[CaseVerdict] = []
        if not batch.wants_reply:
            self.stats.uploads += len(message.answered)
        else:
            for esc, answer in message.answered:
                if esc.expired(now):
                    self.stats.expired += 1
                    continue
                assert esc.corr is not None
                verdicts.append(
                    CaseVerdict(
                        id=esc.id,
                        corr=esc.corr,
                        label=answer.label,
                        confidence=answer.confidence,
                        model=answer.model,
                    )
                )
            if verdicts:
                send = self._send_reply(message, verdicts)
        for stored in {id(f): f for f in message.stored}.values():
            try:
                await stored
            except StoreError as exc:
                self.stats.store_errors += 1
                log.error("hard examples not stored: %s", exc)
        if send is not None:
            try:
                await send
            except Exception:
                ok = False
                self.stats.reply_failures += 1
            else:
                self.stats.replies += 1
                self.stats.verdicts += len(verdicts)
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
        props: Properties | None = None
        if self.session.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            inbound = message.msg.properties
            corr = batch.corr.encode()
            if inbound is not None:
                corr = getattr(inbound, "CorrelationData", None) or corr
                response_topic = getattr(inbound, "ResponseTopic", None)
                if isinstance(response_topic, str) and _is_reply_topic(response_topic, batch.node):
                    topic = response_topic
            props.CorrelationData = corr
            deadlines = [e.deadline for e, _ in message.answered if e.deadline is not None]
            if deadlines:
                props.MessageExpiryInterval = max(1, int(max(deadlines) - time.time() + 1))
        try:
            return self.session.publish_nowait(
                topic, encode_replies(reply), qos=1, properties=props
            )
        except MqttError as exc:  # pragma: no cover - publish_nowait reports through the future
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
            return fut


def _by_input_kind(jobs: list[_Job]) -> list[list[_Job]]:
    """``jobs`` split by input dtype and shape (one group in the usual case), order kept."""
    if not jobs:
        return []
    first = jobs[0].esc
    dtype, shape = first.dtype, first.shape
    if all(j.esc.dtype == dtype and j.esc.shape == shape for j in jobs):
        return [jobs]
    groups: dict[tuple[str, tuple[int, ...]], list[_Job]] = defaultdict(list)
    for j in jobs:
        groups[(j.esc.dtype, tuple(j.esc.shape))].append(j)
    return list(groups.values())


def _stack(group: list[_Job]) -> np.ndarray:
    """The group's inputs (one dtype and shape, checked when their message was decoded) as one
    writable ``[N, *shape]`` array."""
    first = group[0].esc
    data = bytearray(b"".join(j.esc.data for j in group))
    return np.frombuffer(data, dtype=DTYPES[first.dtype]).reshape(len(group), *first.shape)

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

The stages live apart, each named for what it keeps: :mod:`cloud_worker.intake` (decode,
check, dedup, back-pressure), :mod:`cloud_worker.pipeline` (one model's ordered batches),
:mod:`cloud_worker.answers` (each case decided once), :mod:`cloud_worker.settle` (reply, then
acknowledge once durable), :mod:`cloud_worker.presence` and :mod:`cloud_worker.telemetry`. This
module wires them and runs the worker's life: start, subscribe, drain, stop.

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
import logging
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Self

from cloud_worker.answers import Decider
from cloud_worker.cache import BoundedCache
from cloud_worker.config import WorkerConfig
from cloud_worker.handler import Handler, HandlerFn
from cloud_worker.intake import QUEUED_BATCHES_MAX, Intake
from cloud_worker.jobs import Job
from cloud_worker.onnx_model import onnx_handler
from cloud_worker.pipeline import BATCHES_IN_FLIGHT, ModelPipeline
from cloud_worker.presence import Presence
from cloud_worker.settle import Settler
from cloud_worker.stats import WorkerStats
from cloud_worker.store import Answer, HardExampleStore
from cloud_worker.telemetry import TelemetryReporter
from edgewise.mqtt import ConnectInfo, Inbound, MqttSession, max_packet_for
from edgewise.serving.acks import InOrderAcker
from edgewise.serving.batcher import MicroBatcher
from edgewise.serving.model import ServedModel

__all__ = ["BATCHES_IN_FLIGHT", "PRESENCE_CHECK_S", "QUEUED_BATCHES_MAX", "Worker", "WorkerStats"]

log = logging.getLogger(__name__)

PRESENCE_CHECK_S = 1.0
"""How often the presence's reasons are compared with what it last said."""


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
        self._pipelines: dict[str, ModelPipeline] = {}
        self._batchers: dict[str, MicroBatcher[Job]] = {}
        self._answering: set[asyncio.Task[None]] = set()
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
        (docs/adr/0074-cloud-availability.md, docs/adr/0080-worker-status.md)."""
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
        answered: BoundedCache[Answer] = BoundedCache(config.answered_cache_entries)
        in_progress: dict[str, list[Job]] = {}
        self._settler = Settler(
            self.worker_id, session=self.session, acker=self._acker, stats=self.stats
        )
        self._decider = Decider(
            self.worker_id,
            stats=self.stats,
            answered=answered,
            in_progress=in_progress,
            store=self.store,
            settle=self._settler.settle,
        )
        self._intake = Intake(
            topics=self.topics,
            limits=self.limits,
            max_batch_size=config.batching.max_batch_size,
            session=self.session,
            acker=self._acker,
            stats=self.stats,
            batchers=self._batchers,
            answered=answered,
            in_progress=in_progress,
            settle=self._settler.settle,
        )

    def _on_message(self, msg: Inbound) -> None:
        self._intake.on_message(msg)

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
                pipeline = ModelPipeline(
                    name,
                    handler,
                    self.config.batching,
                    store=self.store,
                    stats=self.stats,
                    decider=self._decider,
                    answering=self._answering,
                    before_batch=self._intake.before_batch,
                )
                self._pipelines[name] = pipeline
                self._batchers[name] = pipeline.batcher
                loops.append(
                    tasks.create_task(pipeline.batcher.run(), name=f"worker-batcher-{name}")
                )
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
        for p in self._pipelines.values():
            p.close()
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
        if self._intake.draining:
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
            if not self._intake.draining:
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
        self._intake.draining = True
        self._intake.take_deferred()  # received before: in hand
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
            "held_back_messages": len(self._intake.deferred),
            "in_progress": len(self._intake.in_progress),
            "in_handler_batches": len(self._answering),
            "replying": len(self._settler.settling),
            "rows_to_commit": self.store.queued,
            "unacknowledged": self._acker.outstanding,
        }

    async def _finish_in_hand(self) -> None:
        for b in self._batchers.values():
            await b.wait_idle()
        settler = self._settler
        while self._answering or settler.settling:
            if self._answering:
                await asyncio.gather(*self._answering, return_exceptions=True)
            else:
                await settler.all_settled.wait()
        await self.store.flush()

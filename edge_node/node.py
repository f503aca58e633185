"""The edge node: sensor frames in, local inference, result batches out through a durable outbox.

This module is the wiring and the lifecycle; each promise lives in a collaborator. One frame,
from receipt to the PUBACK that deletes its result:

1. :class:`~edge_node.intake.Intake` (the frames' connection's ``on_message``): parse the topic,
   decode and validate the frame (size cap first), check it fits the model, drop a copy of a
   frame being answered; hand it to the batcher (``to_inference``, a
   :class:`~edgewise.serving.batcher.MicroBatcher`). It stops reading while the node holds as
   many frames as it may (:class:`~edge_node.intake.FramesInHand`).
2. :class:`~edge_node.answering.Answerer` (what the batcher runs): skip frames answered already,
   run the model on the inference thread (:class:`~edge_node.served.ServedSlot`), triage the
   unsure ones to the escalator, and put the results in the store queue (``to_store``).
3. :class:`~edge_node.results.ResultPath`: store one results message per commit through
   :meth:`~edge_node.outbound.Outbound.store_and_offer`; only once it is durable are the frames
   acknowledged to the broker (in arrival order, in batches: the
   :class:`~edgewise.serving.acks.InOrderAcker`); then the record goes to the forwarder
   (``to_uplink``), which publishes it and deletes it after its PUBACK.

Anything that breaks the contract is dead-lettered and acknowledged at once; nothing from the
network can stop the node. Beside the path: :class:`~edge_node.status.NodeStatus` (the retained
status on every connection that can say it), :class:`~edge_node.health.Health` (the checks that
degrade it), :class:`~edge_node.telemetry.TelemetryReport` (the telemetry window) and
:class:`~edge_node.controls.OperatorControls` (pause, resume, thresholds, recycle, swap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Self

from edge_node.answering import Answerer
from edge_node.config import NodeConfig
from edge_node.connections import Handlers, connect_node
from edge_node.controls import OperatorControls
from edge_node.deadletter import DeadLetters
from edge_node.escalation import Escalator
from edge_node.health import Health
from edge_node.intake import FramesInHand, Intake, Pending
from edge_node.outbound import RESULT, Confirmations, Outbound, Tasks
from edge_node.results import ResultPath
from edge_node.served import ServedSlot
from edge_node.stats import NodeStats, plural
from edge_node.status import NodeStatus, State
from edge_node.telemetry import TelemetryReport
from edge_node.updates import UpdateManager
from edgewise.mqtt import Conflict, ConnectInfo, Inbound, MqttSession
from edgewise.outbox import AsyncOutbox
from edgewise.serving.acks import InOrderAcker
from edgewise.serving.batcher import MicroBatcher
from edgewise.serving.model import ServedModel
from edgewise.telemetry import TelemetryWindow

__all__ = ["RESULT", "EdgeNode", "NodeStats", "State", "plural"]

log = logging.getLogger(__name__)


class EdgeNode:
    """An edge node bound to one broker; use as ``async with EdgeNode(config) as node``."""

    def __init__(self, config: NodeConfig, *, model: ServedModel | None = None) -> None:
        self.config = config
        self.node_id = node_id = config.node_id
        # Read once, here: a bad classes file or an unknown class stops the node at start.
        self.hardware = config.hardware()
        self.topics = topics = config.topics.to_topics()
        self.limits = config.limits.to_limits()
        self.boot_id = str(uuid.uuid4())
        self.stats = NodeStats()
        self.served = ServedSlot(model)
        self.status = NodeStatus(
            node_id=node_id,
            topic=topics.status(node_id),
            boot_id=self.boot_id,
            hardware_class=self.hardware.name,
            model=lambda: self.served.loaded,
            configured_model=(config.model.name, config.model.release),
        )
        # One count of takeovers for all the node's connections: a duplicate of the node gives
        # way after 5 in all, not 5 per connection (docs/adr/0073-client-id-conflict.md).
        self.conflict = Conflict()
        self.session, self.uplink = connect_node(
            config,
            self.status,
            self.conflict,
            Handlers(
                frames=self._on_message,
                frames_connected=self._on_connect,
                uplink_message=self._on_uplink_message,  # confirmations (end-to-end mode)
                uplink_connected=self._on_uplink_connect,
                taken_over=self._taken_over,
            ),
        )
        self._sessions = [self.session, self.uplink]
        outbox_config = config.storage.outbox_config(node_id)
        self._outbox_path = outbox_config.path
        self.outbox = AsyncOutbox(outbox_config)
        self._e2e = e2e = config.end_to_end
        storage = config.storage
        self._tasks = Tasks()
        self.outbound = Outbound(self.outbox, self.uplink, storage, e2e, self._tasks)
        self.forwarder = self.outbound.to_uplink
        self.results_forwarder = self.outbound.results_to_uplink
        self._forwarders = self.outbound.forwarders
        self.deadletters = DeadLetters(
            node_id,
            topics.deadletter(node_id),
            self.outbound.store_event,
            max_per_s=config.deadletter_max_per_s,
        )
        self.confirmations = Confirmations(
            self.uplink,
            topics.acks(node_id),
            self.results_forwarder,
            self.limits,
            self.stats,
            self.deadletters,
        )
        self._acker = InOrderAcker(self.session)
        batching = config.batching
        self.frames = FramesInHand(
            self.session,
            self._acker,
            self.stats,
            self.deadletters,
            max_pending_frames=batching.max_pending_frames,
            max_pending_bytes=batching.max_pending_bytes,
        )
        self.health = Health(
            config.health,
            self.status,
            self.hardware,
            uplink=self.uplink,
            forwarders=self._forwarders,
            results_to_uplink=self.results_forwarder,
            end_to_end=e2e,
            connections=self._all_sessions,
            recycle_s=config.model.recycle_session_h * 3600.0,
            recycle=lambda: self.controls.recycle_session(),
            draining=lambda: self.intake.draining,
        )
        # Hybrid inference (docs/adr/0030-escalation.md): unsure verdicts go to cloud workers.
        self.escalator: Escalator | None = None
        if config.escalation.enabled:
            self.escalator = Escalator(
                config.escalation,
                node_id=node_id,
                node_mqtt=config.uplink or config.mqtt,
                topics=topics,
                state_dir=storage.state_dir,
                deliver=lambda finals: self.results.store_finals(finals),
                synchronous=storage.synchronous,
                outbox=self.outbox,  # one outbox for everything the node sends (ADR 0069)
                on_cloud_change=self.health.cloud_changed,
                conflict=self.conflict,
            )
        self.results = ResultPath(
            node_id,
            topics.results(node_id),
            frames=self.frames,
            outbound=self.outbound,
            uplink=self.uplink,
            status=self.status,
            stats=self.stats,
            tasks=self._tasks,
            escalator=self.escalator,
            answered_keep=storage.answered_keep,
            as_json=config.results_encoding == "json",
            max_results_per_message=batching.max_results_per_message,
        )
        self.controls = OperatorControls(
            self.served,
            self.hardware,
            status=self.status,
            health=self.health,
            stats=self.stats,
            escalator=self.escalator,
            waiting=lambda: len(self._batcher),
        )
        self.updates = self._updater()
        self.telemetry = TelemetryReport(
            TelemetryWindow(node=node_id, boot_id=self.boot_id, started_at=time.time()),
            topics.telemetry(node_id),
            window_s=config.telemetry.window_s,
            hardware=self.hardware,
            hardware_class=config.hardware_class,
            served=self.served,
            status=self.status,
            stats=self.stats,
            outbound=self.outbound,
            sessions=self._sessions,
            connections=self._all_sessions,
            forwarders=self._forwarders,
            results_to_uplink=self.results_forwarder,
            end_to_end=e2e.enabled,
            deadletters=self.deadletters,
            escalator=self.escalator,
            updates=self.updates,
            draining=lambda: self.intake.draining,
        )
        self.answerer = Answerer(
            self.served,
            frames=self.frames,
            results=self.results,
            status=self.status,
            stats=self.stats,
            tasks=self._tasks,
            serving=self.controls.serving,
            escalator=self.escalator,
            updates=self.updates,
            observe_latency_ms=self.telemetry.window.observe_latency,
        )
        self._batcher: MicroBatcher[Pending] = MicroBatcher(
            self.answerer.process,
            max_batch_size=batching.max_batch_size,
            max_wait_s=batching.max_wait_ms / 1000.0,
        )
        self.intake = Intake(
            self.session,
            topics,
            self.limits,
            self._acker,
            self.frames,
            self.stats,
            model=lambda: self.served.model,
            maybe_answered=self.results.maybe_answered,
            to_inference=self._batcher,
        )
        self._stack: contextlib.AsyncExitStack | None = None

    def _updater(self) -> UpdateManager | None:
        """The updater, if the node is enrolled with a root key (see docs/model-updates.md)."""
        c = self.config
        if c.updates.root_key is None:
            return None
        return UpdateManager(
            c.updates,
            node_id=self.node_id,
            hardware=self.hardware,
            mqtt=c.uplink or c.mqtt,
            topics=self.topics,
            state_dir=c.storage.state_dir / f"{self.node_id}.updates",
            model_name=c.model.name,
            model_release=c.model.release,
            model_path=c.model.resolved_path(),
            swap=self.swap_model,
            commands=self.controls.commands(lambda: self.close_window()),
            publish_event=lambda topic, payload: self.outbound.store_event(
                topic, payload, retain=True
            ),
            dead_letter=lambda topic, payload, reason, detail: self.deadletters.reject(
                topic, payload, reason, detail
            ),
            conflict=self.conflict,
        )

    # ------------------------------------------------------------------ lifecycle
    @property
    def model(self) -> ServedModel:
        return self.served.model

    @property
    def reasons(self) -> list[str]:
        return self.status.reasons

    @property
    def state(self) -> State:
        return self.status.state

    async def __aenter__(self) -> Self:
        boot = None if self.updates is None else self.updates.boot
        model = await self.served.load(self.hardware, self.config.model, boot)
        if self.escalator is not None:
            self.escalator.use_manifest_thresholds(model.name, model.thresholds)
        log.info(
            "node %s (hardware class %s) serving %s release %d on %s (%s)",
            self.node_id,
            self.hardware.name,
            model.name,
            model.release,
            model.runtime.name,
            model.runtime.provider,
        )
        self.health.check_accelerator(model)
        async with contextlib.AsyncExitStack() as stack:
            await self.outbound.open(stack, self.status, self._outbox_path)
            await self.results.remember_answered()  # before any frame can come
            for session in self._sessions:
                await stack.enter_async_context(session)
            if self.escalator is not None:
                await stack.enter_async_context(self.escalator)
            for f in self.config.topics.sensor_filters():
                self.session.subscribe(f, qos=1)
            if self._e2e.enabled:
                self.uplink.subscribe(self.confirmations.topic, qos=1)
            if self.updates is not None:
                await stack.enter_async_context(self.updates)
            tasks = await stack.enter_async_context(asyncio.TaskGroup())
            loops = [
                tasks.create_task(self._batcher.run(), name="edge-node-batcher"),
                *(
                    tasks.create_task(f.run(), name=f"edge-node-forwarder-{i}")
                    for i, f in enumerate(self._forwarders)
                ),
                tasks.create_task(self.health.run(), name="edge-node-health"),
                tasks.create_task(self.telemetry.run(), name="edge-node-telemetry"),
            ]
            stack.callback(lambda: [t.cancel() for t in loops])
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._stack is not None:
                # The caller's exception goes on by itself: handing it to the TaskGroup inside
                # the stack would wrap it in an ExceptionGroup.
                await self._stack.__aexit__(None, None, None)
        finally:
            self.served.close()

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop taking frames, finish the ones in hand, say offline; True if all finished in time.

        Frames that arrive from now on are left unacknowledged: the broker keeps them in the
        node's persistent session and redelivers them when the node comes back. Results that are
        stored but not yet delivered are sent while time remains and otherwise stay in the outbox
        for the next start.
        """
        self.intake.draining = True
        self.resume_inference({})  # frames held by a pause are in hand: they are finished too
        self.session.resume_reading()  # frames that come now are left to the broker, unheld
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        finished = True
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._finish_in_flight())
        except TimeoutError:
            finished = False
            log.warning(
                "drain timed out after %.1f s; unfinished frames will be redelivered", timeout_s
            )
        with contextlib.suppress(Exception):  # the last, partial window
            await self.close_window()
        if self.uplink.connected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    for forwarder in self._forwarders:
                        await forwarder.wait_idle()
                        await forwarder.flush()
        left = self.outbox.stats().rows
        if left:
            log.info("%s stay in the outbox for the next start", plural(left, "record"))
        await self.status.say_offline("shutdown")
        return finished

    async def _finish_in_flight(self) -> None:
        await self._batcher.wait_idle()
        await self.results.settled()

    @property
    def results_delivered(self) -> int:
        """Results the broker has acknowledged (from the outbox, or published directly)."""
        delivered = self.results_forwarder.stats.delivered_items.get(RESULT, 0)
        return delivered + self.stats.results_acked

    def summary(self) -> str:
        """What the node did since it started, for its stop line."""
        s = self.stats
        left = self.outbox.stats().rows_by_kind.get("result", 0) if self.outbound.is_open else 0
        return (
            f"{plural(s.frames_in, 'frame')} in ({s.frames_already_answered} answered already,"
            f" {s.rejected} rejected); {plural(s.results_out, 'result')} made,"
            f" {self.results_delivered} acknowledged by the broker;"
            f" {plural(left, 'results record')} left in the outbox"
        )

    def describe(self) -> dict[str, object]:
        """Where the node's work stands (logged on SIGUSR1, for an operator chasing a stall)."""
        head = self._acker.head
        return {
            "connected": self.session.connected,
            "connection": self.session.connection,
            "uplink_connected": self.uplink.connected,
            "uplink_oldest_unacked_s": round(self.health.oldest_in_flight_s(), 3),
            "reading_paused": self.session.reading_paused,
            "held_frames": self.frames.held(),
            "held_bytes": self._acker.held_bytes,
            "waiting_for_inference": len(self._batcher),
            "storing": len(self._tasks),
            "unacknowledged_frames": self._acker.outstanding,
            "oldest_unacknowledged": None
            if head is None
            else f"mid {head.message.mid} conn {head.message.connection} done {head.done}",
            "uplink_in_flight": sum(f.in_flight for f in self._forwarders),
            "results_unconfirmed": self.results_forwarder.unconfirmed,
            "outbox_rows": self.outbox.stats().rows,
            "frames_in": self.stats.frames_in,
            "results_stored": self.stats.results_stored,
            "results_delivered": self.results_delivered,
            "already_answered": self.stats.frames_already_answered,
        }

    # ------------------------------------------------------------------ connections
    def _on_message(self, msg: Inbound) -> None:
        self.intake.on_message(msg)

    def _on_uplink_message(self, msg: Inbound) -> None:
        self.confirmations.on_message(msg)

    async def _on_connect(self, info: ConnectInfo) -> None:
        self.health.sync_conflict()
        await self.status.connected(self.session)

    async def _on_uplink_connect(self, info: ConnectInfo) -> None:
        self.health.uplink_up()
        self.health.sync_conflict()
        await self.status.connected(self.uplink)

    def _taken_over(self, connection: int) -> None:
        self.health.sync_conflict()

    def _all_sessions(self) -> list[MqttSession]:
        """Every long-lived connection of the node (the downloader's comes and goes)."""
        sessions = list(self._sessions)
        if self.updates is not None:
            sessions.append(self.updates.session)
        if self.escalator is not None:
            sessions.append(self.escalator.uplink)
        return sessions

    # ------------------------------------------------------------------ operator controls
    async def close_window(self) -> None:
        """End the current telemetry window and send it (:class:`TelemetryReport`)."""
        await self.telemetry.close_window()

    def swap_model(self, new: ServedModel) -> ServedModel:
        return self.controls.swap_model(new)

    def set_threshold(self, args: Mapping[str, str]) -> str:
        return self.controls.set_threshold(args)

    @property
    def inference_paused(self) -> bool:
        return self.controls.inference_paused

    def pause_inference(self, args: Mapping[str, str]) -> str:
        return self.controls.pause_inference(args)

    def resume_inference(self, args: Mapping[str, str]) -> str:
        return self.controls.resume_inference(args)

    async def recycle_session(self) -> bool:
        return await self.controls.recycle_session()

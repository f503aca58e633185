"""The edge node: sensor frames in, local inference, result batches out through a durable outbox.

Per frame: parse the topic, decode and validate the frame (size cap first), check it fits the
model, micro-batch, run the model on an inference thread, and store one results message per
batch in the SQLite outbox. A frame is acknowledged to the broker (in arrival order, in batches)
only once its result is durable; the forwarder then publishes the outbox to the broker and
deletes each record after its PUBACK. Anything that breaks the contract is dead-lettered and
acknowledged at once; nothing from the network can stop the node.

Every copy of a frame whose result is already in the outbox (the newest
``storage.answered_keep`` frames) is acknowledged without a second inference, whatever brought
it again: a broker's redelivery (DUP flag, after a reconnect or a crash), a sensor that re-sends
on a clean session, a broker restarted from an older save. So each frame gets one result id
(:mod:`edge_node.answered`: the look-up every frame pays).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import msgspec
import numpy as np

from edge_node.answered import AnsweredFilter
from edge_node.config import NodeConfig
from edge_node.connections import Handlers, connect_node
from edge_node.deadletter import DeadLetters
from edge_node.errors import ConfigError
from edge_node.escalation import HARD_EXAMPLE, Case, Escalator, Final
from edge_node.hardware import load_model
from edge_node.health import Health
from edge_node.inference import AdaptiveRunner
from edge_node.stats import NodeStats
from edge_node.status import NodeStatus, State
from edge_node.updates import UpdateManager
from edgewise.mqtt import (
    Conflict,
    ConnectInfo,
    Inbound,
    MqttSession,
)
from edgewise.outbox import (
    AsyncOutbox,
    Confirmation,
    Forwarder,
    OutboxError,
    Record,
    StorageFull,
    Stored,
)
from edgewise.outbox.store import answered_cost
from edgewise.serving.acks import InOrderAcker, Ticket
from edgewise.serving.batcher import MicroBatcher
from edgewise.serving.model import Prediction, ServedModel
from edgewise.telemetry import TelemetryWindow
from schemas import (
    ContractError,
    DeadLetterReason,
    EdgeVerdict,
    Frame,
    Result,
    ResultBatch,
    Telemetry,
    decode_acks,
    decode_frames,
    decode_results,
    encode_results,
    encode_telemetry,
    message_id,
    new_ids,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    ticket: Ticket
    device: str
    sensor: str
    frame: Frame
    key: str
    """What identifies the frame across redeliveries: where it came from and its seq/ts."""
    check: bool = False
    """It may have been answered already: look it up before answering it."""
    finished: bool = False
    """Its part of the ticket is done: finishing it again must not count another part."""


#: Bytes one result takes in a results message, at most (MessagePack ~150, JSON ~280).
_RESULT_BYTES_MAX = 300


def _store_bytes(entry: tuple[list[Result], list[tuple[str, str]], list[_Pending]]) -> int:
    """What one entry of results waiting to be stored costs the outbox's transaction."""
    results, answered, _ = entry
    return len(results) * _RESULT_BYTES_MAX + sum(answered_cost(k, r) for k, r in answered)


#: The record kind of results messages (what end-to-end mode holds until confirmed).
RESULT = "result"


def _message_id_of(record: Stored) -> str:
    """The id a consumer confirms a stored results message by (:func:`schemas.message_id`)."""
    return message_id(decode_results(record.payload))


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 record``, ``0 records``, ``2 records``."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def _frame_key(topic: str, frame: Frame, digest: str, index: int | None = None) -> str:
    # seq and ts alone repeat when a sensor without a clock restarts its counter; the payload's
    # digest keeps such a new frame from being taken for an answered one. A frame of a batch
    # adds its index in the message.
    key = f"{topic}\x00{frame.seq}\x00{frame.ts!r}\x00{digest}"
    return key if index is None else f"{key}\x00{index}"


class EdgeNode:
    """An edge node bound to one broker; use as ``async with EdgeNode(config) as node``."""

    def __init__(self, config: NodeConfig, *, model: ServedModel | None = None) -> None:
        self.config = config
        self.node_id = config.node_id
        # Read once, here: a bad classes file or an unknown class stops the node at start.
        self.hardware = config.hardware()
        self.topics = config.topics.to_topics()
        self.limits = config.limits.to_limits()
        self._model = model
        self.boot_id = str(uuid.uuid4())
        self.stats = NodeStats()
        self._window = TelemetryWindow(
            node=self.node_id, boot_id=self.boot_id, started_at=time.time()
        )
        self._telemetry_topic = self.topics.telemetry(self.node_id)
        self._seq = 0
        self._results_as_json = config.results_encoding == "json"
        self._max_pending = config.batching.max_pending_frames
        self._serving = asyncio.Event()
        """Clear while an operator has paused inference (docs/adr/0065-pause-inference.md)."""
        self._serving.set()
        self._results_topic = self.topics.results(self.node_id)
        self._draining = False
        self._storing: set[asyncio.Task[None]] = set()
        # Events made off the event loop (the updater's boot runs in a thread, before the
        # outbox is open): stored from the loop once it can (deque: thread-safe append/pop).
        self._offloop_events: deque[Record] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox_open = False
        self._to_store: deque[tuple[list[Result], list[tuple[str, str]], list[_Pending]]] = deque()
        self._store_task: asyncio.Task[None] | None = None
        self._max_results_per_message = config.batching.max_results_per_message
        # Frames being answered, by key -> copies that came meanwhile, acknowledged with them.
        self._in_progress: dict[str, list[Ticket]] = {}
        # Answered frames whose result is not in the outbox's answered table yet (sent to the
        # cloud, acknowledged once journaled), by key -> result id.
        self._answering: dict[str, str] = {}
        self._answered = AnsweredFilter(config.storage.answered_keep)
        self._results_in_flight: set[asyncio.Future[None]] = set()
        self.status = NodeStatus(
            node_id=self.node_id,
            topic=self.topics.status(self.node_id),
            boot_id=self.boot_id,
            hardware_class=self.hardware.name,
            model=lambda: self._model,
            configured_model=(config.model.name, config.model.release),
        )
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._inference: AdaptiveRunner[np.ndarray, Prediction] | None = None
        self._stack: contextlib.AsyncExitStack | None = None
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
                uplink_message=self._on_uplink_message,
                uplink_connected=self._on_uplink_connect,
                taken_over=self._taken_over,
            ),
        )
        self._sessions = [self.session, self.uplink]
        self._max_pending_bytes = config.batching.max_pending_bytes
        outbox_config = config.storage.outbox_config(self.node_id)
        self._outbox_path = outbox_config.path
        self.outbox = AsyncOutbox(outbox_config)
        # End-to-end mode (docs/adr/0078-end-to-end-acks.md): results go through a forwarder of
        # their own that holds each until its consumer confirms it on edge/{node}/acks; the
        # rest (telemetry, events) never waits behind them.
        self._e2e = config.end_to_end
        self._acks_topic = self.topics.acks(self.node_id)
        held = frozenset({RESULT}) if self._e2e.enabled else frozenset()
        self.forwarder = Forwarder(
            self.outbox,
            self.uplink,
            window=config.storage.uplink_window,
            drain_max_per_s=config.storage.drain_max_msgs_per_s,
            exclude_kinds=frozenset({HARD_EXAMPLE}) | held,  # the escalator's sends those
        )
        self.results_forwarder = self.forwarder
        if self._e2e.enabled:
            self.results_forwarder = Forwarder(
                self.outbox,
                self.uplink,
                window=config.storage.uplink_window,
                drain_max_per_s=config.storage.drain_max_msgs_per_s,
                kinds=held,
                confirmation=Confirmation(
                    kinds=held,
                    key=_message_id_of,
                    resend_after_s=self._e2e.resend_after_s,
                    resend_max_s=self._e2e.resend_max_s,
                    max_unconfirmed=self._e2e.max_unconfirmed,
                ),
            )
        self._forwarders = list(dict.fromkeys([self.forwarder, self.results_forwarder]))
        self._acker = InOrderAcker(self.session)
        self.health = Health(
            config.health,
            self.status,
            self.hardware,
            uplink=self.uplink,
            forwarders=self._forwarders,
            results_to_uplink=self.results_forwarder,
            end_to_end=self._e2e,
            connections=self._all_sessions,
            recycle_s=config.model.recycle_session_h * 3600.0,
            recycle=lambda: self.recycle_session(),
            draining=lambda: self._draining,
        )
        # Hybrid inference (docs/adr/0030-escalation.md): unsure verdicts go to cloud workers.
        self.escalator: Escalator | None = None
        if config.escalation.enabled:
            self.escalator = Escalator(
                config.escalation,
                node_id=self.node_id,
                node_mqtt=config.uplink or config.mqtt,
                topics=self.topics,
                state_dir=config.storage.state_dir,
                deliver=self._store_finals,
                synchronous=config.storage.synchronous,
                outbox=self.outbox,  # one outbox for everything the node sends (ADR 0069)
                on_cloud_change=self.health.cloud_changed,
                conflict=self.conflict,
            )
        self._batcher: MicroBatcher[_Pending] = MicroBatcher(
            self._process,
            max_batch_size=config.batching.max_batch_size,
            max_wait_s=config.batching.max_wait_ms / 1000.0,
        )
        self.updates = self._updater()
        self.deadletters = DeadLetters(
            self.node_id,
            self.topics.deadletter(self.node_id),
            self._store_event,
            max_per_s=config.deadletter_max_per_s,
        )

    # ------------------------------------------------------------------ lifecycle
    async def _infer(self, inputs: np.ndarray) -> Prediction:
        assert self._inference is not None, "made with the model on entering the context"
        return await self._inference(inputs)

    @property
    def model(self) -> ServedModel:
        assert self._model is not None, "the node's model is loaded on entering the context"
        return self._model

    @property
    def reasons(self) -> list[str]:
        return self.status.reasons

    @property
    def state(self) -> State:
        return self.status.state

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        if self._model is None and self.updates is not None:
            self._model = await asyncio.to_thread(self.updates.boot)
        if self._model is None:
            m = self.config.model
            self._model = load_model(
                self.hardware,
                m.resolved_path(),
                name=m.name,
                release=m.release,
                output=m.output,
            )
        self._inference = AdaptiveRunner(self.model.predict, self._pool)
        if self.escalator is not None:
            self.escalator.use_manifest_thresholds(self.model.name, self.model.thresholds)
        log.info(
            "node %s (hardware class %s) serving %s release %d on %s (%s)",
            self.node_id,
            self.hardware.name,
            self.model.name,
            self.model.release,
            self.model.runtime.name,
            self.model.runtime.provider,
        )
        self.health.check_accelerator(self.model)
        try:
            self._outbox_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"storage.state_dir {self._outbox_path.parent} cannot be created: {exc}"
            ) from None
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.outbox)
            self._outbox_open = True
            self._store_offloop_events()
            for key in await self.outbox.answered_keys():  # before any frame can come
                self._answered.add(key)
            stored = self.outbox.stats()
            if self.outbox.recovered_from is not None:
                # Said in the status until the next start, so that someone looks at the file.
                self.reasons.append("outbox_corrupt")
                log.error(
                    "the outbox was unreadable: kept it as %s and started a fresh one",
                    self.outbox.recovered_from,
                )
            log.info(
                "outbox %s: %s waiting from earlier runs; %s remembered",
                self._outbox_path,
                plural(stored.rows, "record")
                + (f" ({stored.bytes - stored.answered_bytes} bytes)" if stored.rows else ""),
                plural(stored.answered_keys, "answered frame"),
            )
            for session in self._sessions:
                await stack.enter_async_context(session)
            if self.escalator is not None:
                await stack.enter_async_context(self.escalator)
            for f in self.config.topics.sensor_filters():
                self.session.subscribe(f, qos=1)
            if self._e2e.enabled:
                self.uplink.subscribe(self._acks_topic, qos=1)
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
                tasks.create_task(self._telemetry_loop(), name="edge-node-telemetry"),
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
            self._pool.shutdown(wait=True)
            if self._model is not None:
                self._model.close()

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop taking frames, finish the ones in hand, say offline; True if all finished in time.

        Frames that arrive from now on are left unacknowledged: the broker keeps them in the
        node's persistent session and redelivers them when the node comes back. Results that are
        stored but not yet delivered are sent while time remains and otherwise stay in the outbox
        for the next start.
        """
        self._draining = True
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
        if self.escalator is not None:  # pending cases end by their deadline at the latest
            await asyncio.gather(*list(self._storing), return_exceptions=True)
            await self.escalator.wait_settled()
        while self._storing or self._results_in_flight:
            await asyncio.gather(
                *list(self._storing), *list(self._results_in_flight), return_exceptions=True
            )

    @property
    def results_delivered(self) -> int:
        """Results the broker has acknowledged (from the outbox, or published directly)."""
        delivered = self.results_forwarder.stats.delivered_items.get(RESULT, 0)
        return delivered + self.stats.results_acked

    def summary(self) -> str:
        """What the node did since it started, for its stop line."""
        s = self.stats
        left = self.outbox.stats().rows_by_kind.get("result", 0) if self._outbox_open else 0
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
            "held_frames": self._held(),
            "held_bytes": self._acker.held_bytes,
            "waiting_for_inference": len(self._batcher),
            "storing": len(self._storing),
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

    def _frames_taken_over(self, batch: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
        """Split off the QoS 1 frames whose connection another process took over with our
        client id: the broker redelivers them to that process, which answers them; answering
        them here too would give each a second result id."""
        session = self.session
        if not session.lost_any_to_takeover:
            return batch, []
        kept: list[_Pending] = []
        lost: list[_Pending] = []
        for p in batch:
            m = p.ticket.message
            (lost if m.qos and session.lost_to_takeover(m.connection) else kept).append(p)
        self.stats.frames_left_to_other += len(lost)
        return kept, lost

    def _end_to_end_counts(self) -> dict[str, int]:
        if not self._e2e.enabled:
            return {}
        f = self.results_forwarder.stats
        return {
            "acks_received": self.stats.acks_received,
            "acks_rejected": self.stats.acks_rejected,
            "results_confirmed": f.confirmed,
            "results_resent": f.resent,
            "results_unconfirmed_evicted": f.unconfirmed_evicted,
            "confirmations_unknown": f.confirmations_unknown,
        }

    async def _telemetry_loop(self) -> None:
        window_s = self.config.telemetry.window_s
        next_at = time.monotonic() + window_s
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += window_s
            if not self._draining:
                await self.close_window()

    async def close_window(self) -> None:
        """End the current telemetry window: check the latency SLO, store the window's message
        in the outbox (kind ``telemetry``) and hand it to the forwarder."""
        slo_ms = self.hardware.latency_slo_p99_ms
        if slo_ms > 0:
            p99 = self._window.sketch.quantile(0.99)
            self.status.set("latency_slo", p99 is not None and p99 > slo_ms)
        payload = encode_telemetry(self._telemetry_message())
        self.stats.telemetry_windows += 1
        failed = await self._via_outbox(Record("telemetry", self._telemetry_topic, payload))
        if failed is not None:  # a full disk shows here even when no frame comes
            reason = "storage_full" if isinstance(failed, StorageFull) else "storage_error"
            self.status.set(reason, True)
            return
        self.status.set("storage_full", False)
        self.status.set("storage_error", False)

    def _telemetry_message(self) -> Telemetry:
        stats = self.stats
        st = self.outbox.stats()
        reconnects = sum(s.stats.reconnects for s in self._sessions)
        esc = self.escalator.stats if self.escalator is not None else None
        escalation_counts = (
            {}
            if esc is None
            else {
                "escalations": esc.escalated,
                "cloud": esc.cloud,
                "cloud_cached": esc.cached,
                "edge_fallback": esc.fallback,
                "edge_offline": esc.offline,
                "late_replies": esc.late_replies,
                "edge_fallback_cloud_unavailable": esc.unavailable_fallback,
                "cloud_unavailable_episodes": esc.unavailable_episodes,
                "cloud_probes": esc.probes,
            }
        )
        m = self.model
        return self._window.build(
            time.time(),
            counts_total={
                "frames": stats.frames_in,
                "results": stats.results_out,
                "results_stored": stats.results_stored,
                "rejected": stats.rejected,
                "already_answered": stats.frames_already_answered,
                "deadletters": self.deadletters.published,
                "deadletters_suppressed": self.deadletters.suppressed,
                "inference_errors": stats.inference_errors,
                "publish_failures": stats.publish_failures,
                "reconnects": reconnects,
                "takeovers": sum(s.stats.takeovers for s in self._all_sessions()),
                "bytes_received": sum(s.bytes_received for s in self._all_sessions()),
                "frames_left_to_other": stats.frames_left_to_other,
                **self._update_counts(),
                "session_recycles": stats.session_recycles,
                "uplink_published": sum(f.stats.published for f in self._forwarders),
                "uplink_delivered": sum(f.stats.delivered for f in self._forwarders),
                **self._end_to_end_counts(),
                **escalation_counts,
            },
            rejects_total=dict(stats.rejects),
            evictions=dict(st.evicted_items),  # hard examples included (ADR 0069)
            outbox_rows=st.rows,
            outbox_bytes=st.file_bytes,
            state=self.state,
            reasons=self.reasons,
            model=m.name,
            release=m.release,
            runtime=m.runtime.name,
            provider=m.runtime.provider,
            hardware_class=self.config.hardware_class,
        )

    def _update_counts(self) -> dict[str, int]:
        u = self.updates
        if u is None:
            return {}
        return {
            "control_rejects": u.rejects.total,
            "control_rejects_unreported": u.rejects.suppressed,
            "commands_run": u.stats.commands_run,
        }

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
            commands={
                "recycle_session": lambda args: self.recycle_session(),
                "publish_telemetry": lambda args: self.close_window(),
                "set_threshold": self.set_threshold,
                "pause_inference": self.pause_inference,
                "resume_inference": self.resume_inference,
            },
            publish_event=lambda topic, payload: self._store_event(topic, payload, retain=True),
            dead_letter=lambda topic, payload, reason, detail: self.deadletters.reject(
                topic, payload, reason, detail
            ),
            conflict=self.conflict,
        )

    def swap_model(self, new: ServedModel) -> ServedModel:
        """Serve ``new`` from the next batch on; return the old model (the caller closes it)."""
        old = self.model
        self._model = new
        self._inference = AdaptiveRunner(new.predict, self._pool)
        if self.escalator is not None:  # a release's thresholds go with it (and back on rollback)
            self.escalator.use_manifest_thresholds(new.name, new.thresholds)
        log.info(
            "now serving %s release %d on %s (%s)",
            new.name,
            new.release,
            new.runtime.name,
            new.runtime.provider,
        )
        self.health.model_changed(new)
        return old

    def set_threshold(self, args: Mapping[str, str]) -> str:
        """The ``set_threshold`` command: escalation thresholds for the served model (names in
        ``edge_node.escalation.policy.THRESHOLD_NAMES``) until the node restarts."""
        if self.escalator is None:
            raise ValueError("escalation is off on this node (escalation.enabled = false)")
        if not args:
            raise ValueError("give at least one threshold, e.g. escalate_below=0.8")
        policy = self.escalator.set_thresholds(self.model.name, args)
        shown = policy.model_dump(exclude_none=True)
        return f"{self.model.name}: " + ", ".join(f"{k}={v:g}" for k, v in shown.items())

    @property
    def inference_paused(self) -> bool:
        return not self._serving.is_set()

    def pause_inference(self, args: Mapping[str, str]) -> str:
        """The ``pause_inference`` command: stop running the model. Frames keep arriving and
        wait unacknowledged (the broker holds the rest beyond the session's receive maximum);
        nothing is lost; status says ``degraded: inference_paused`` until resumed or restarted."""
        if self.inference_paused:
            return "inference was paused already"
        self._serving.clear()
        self.status.set("inference_paused", True)
        return "inference paused; frames wait unacknowledged until resume_inference"

    def resume_inference(self, args: Mapping[str, str]) -> str:
        """The ``resume_inference`` command: serve the frames that waited, then go on."""
        if not self.inference_paused:
            return "inference was not paused"
        self._serving.set()
        self.status.set("inference_paused", False)
        return f"inference resumed; {len(self._batcher)} frames were waiting"

    async def recycle_session(self) -> bool:
        """Load the model into a fresh inference session and swap it in between two batches.

        Frames keep being served by the old session while the new one loads; the old one is
        closed once the calls already handed to it have finished. False if the reload failed
        (the old session then goes on serving).
        """
        old = self.model
        if old.path is None:
            log.warning("the served model was not loaded from a file: nothing to recycle")
            return False
        try:
            new = await asyncio.to_thread(
                load_model,
                self.hardware,
                old.path,
                name=old.name,
                release=old.release,
                output=old.output,
            )
        except Exception as exc:  # keep serving with what works
            log.error("recycling the inference session failed, keeping the old one: %s", exc)
            return False
        self._model = new
        self._inference = AdaptiveRunner(new.predict, self._pool)
        self.stats.session_recycles += 1
        # The pool runs one call at a time in order: this runs after every call given to `old`.
        self._pool.submit(old.close)
        log.info("inference session recycled (%d so far)", self.stats.session_recycles)
        self.health.check_accelerator(new)
        return True

    # ------------------------------------------------------------------ hot path
    def _on_uplink_message(self, msg: Inbound) -> None:
        """A message on the uplink's connection: only confirmations are subscribed there."""
        try:
            if msg.topic == self._acks_topic:
                self._on_acks(msg)
        finally:
            self.uplink.ack(msg)

    def _on_acks(self, msg: Inbound) -> None:
        """Confirmations from the consumer (end-to-end mode): delete what they name. Capped,
        schema-checked; a bad one is counted and dead-lettered (rate-capped), never raised."""
        try:
            acks = decode_acks(msg.payload, self.limits)
        except ContractError as exc:
            self.stats.acks_rejected += 1
            self.deadletters.reject(msg.topic, msg.payload, exc.reason, exc.detail)
            return
        self.stats.acks_received += 1
        self.results_forwarder.confirm(acks.ids)

    def _on_message(self, msg: Inbound) -> None:
        if self._draining:
            self.stats.frames_ignored_draining += 1
            return
        if self.session.giving_way:  # another process with this node id has them (ADR 0073)
            self.stats.frames_left_to_other += 1
            return
        self.stats.frames_in += 1
        ticket = self._acker.track(msg)
        try:
            device, sensor = self.topics.parse_sensor(msg.topic)
            frames = decode_frames(msg.payload, self.limits)
        except ContractError as exc:
            self._reject(msg, exc.reason, exc.detail)
            self._acker.finish(ticket)
            return
        except Exception as exc:  # a bug must not hold back every later acknowledgement
            log.exception("unexpected error on a frame from %r", msg.topic[:128])
            self._reject(msg, "internal_error", f"{type(exc).__name__}: {exc}")
            self._acker.finish(ticket)
            return
        digest = hashlib.blake2b(msg.payload, digest_size=8).hexdigest()
        if len(frames) == 1:
            key = _frame_key(msg.topic, frames[0], digest)
            self._take(msg, ticket, device, sensor, frames[0], key)
        else:  # a batch: the message is acknowledged once every frame in it is done
            self.stats.frames_in += len(frames) - 1
            ticket.parts = len(frames)
            for i, frame in enumerate(frames):
                key = _frame_key(msg.topic, frame, digest, i)
                self._take(msg, ticket, device, sensor, frame, key, index=i)
        if self._held() >= self._max_pending or self._acker.held_bytes >= self._max_pending_bytes:
            # The last resort (ADR 0076): Mosquitto before 2.0.13 lets one PUBACK release a
            # whole Receive Maximum of messages, so the broker's window bounds nothing there.
            # Only this connection waits: it carries frames and their acknowledgements out.
            self.session.pause_reading()

    def _take(
        self,
        msg: Inbound,
        ticket: Ticket,
        device: str,
        sensor: str,
        frame: Frame,
        key: str,
        *,
        index: int | None = None,
    ) -> None:
        """Check one frame against the model and queue it for inference."""
        try:
            self.model.check(frame.tensor)
        except Exception as exc:
            where = "" if index is None else f"frame {index} (seq {frame.seq}): "
            if isinstance(exc, ContractError):
                self._reject(msg, exc.reason, where + exc.detail)
            else:  # a bug must not hold back every later acknowledgement
                log.exception("unexpected error on a frame from %r", msg.topic[:128])
                self._reject(msg, "internal_error", f"{where}{type(exc).__name__}: {exc}")
            self._acker.finish(ticket)
            return
        waiting = self._in_progress.get(key)
        if waiting is not None:
            # A copy of a frame still being answered (DUP flag or not): acknowledged with it.
            waiting.append(ticket)
            return
        self._in_progress[key] = []
        check = msg.dup or key in self._answered or key in self._answering
        self._batcher.add(_Pending(ticket, device, sensor, frame, key, check))

    def _held(self) -> int:
        """Frames the node holds in memory: received and not yet acknowledged, whether they
        wait for inference, for their results to be stored, or behind an earlier frame's
        acknowledgement (QoS 0 frames: until they are answered). Counting only those waiting
        for inference let frames pile up behind a slow commit once reading kept pace."""
        return max(len(self._in_progress), self._acker.outstanding)

    def _resume_if_drained(self) -> None:
        if (
            self.session.reading_paused
            and self._held() <= self._max_pending // 2
            and self._acker.held_bytes <= self._max_pending_bytes // 2
        ):
            self.session.resume_reading()

    def _reject(self, msg: Inbound, reason: DeadLetterReason, detail: str) -> None:
        self.stats.rejects[reason] += 1
        self.deadletters.reject(msg.topic, msg.payload, reason, detail)

    def _finish(self, batch: list[_Pending]) -> None:
        """These frames are done (answered, stored or rejected): acknowledge them and any
        redelivered copies that arrived meanwhile."""
        tickets: list[Ticket] = []
        for p in batch:
            if p.finished:
                continue
            p.finished = True
            tickets.append(p.ticket)
            tickets.extend(self._in_progress.pop(p.key, ()))
        self._acker.finish_all(tickets)
        self._resume_if_drained()

    def _forget(self, batch: list[_Pending]) -> None:
        """These frames stay unacknowledged (the broker redelivers them): drop their state."""
        for p in batch:
            self._in_progress.pop(p.key, None)
        self._resume_if_drained()

    async def _process(self, batch: list[_Pending]) -> None:
        if not self._serving.is_set():
            await self._serving.wait()
        try:
            await self._answer(batch)
        except Exception as exc:  # a bug must not stop the batcher, and with it the node
            log.exception("unexpected error on a batch of %d frames", len(batch))
            for p in batch:
                self._reject(p.ticket.message, "internal_error", f"{type(exc).__name__}: {exc}")
            self._finish(batch)
        finally:
            self._resume_if_drained()

    async def _answer(self, batch: list[_Pending]) -> None:
        batch, lost = self._frames_taken_over(batch)
        if lost:
            self._forget(lost)
            if not batch:
                return
        if any(p.check for p in batch):
            batch = await self._skip_answered(batch)
            if not batch:
                return
        model = self.model
        try:
            inputs = np.stack([p.frame.tensor for p in batch])
            pred = await self._infer(inputs)
        except Exception as exc:  # a runtime failure must not stop the node
            if self.updates is not None:
                self.updates.observe(None, count=len(batch), latency_s=0.0)
            self.stats.inference_errors += 1
            log.exception("inference failed on a batch of %d", len(batch))
            self.status.set("model_unavailable", True)  # until a batch is served again
            for p in batch:
                self._reject(p.ticket.message, "inference_failed", f"{type(exc).__name__}: {exc}")
            self._finish(batch)
            return
        self.status.set("model_unavailable", False)
        now = time.monotonic()
        if self.updates is not None:
            oldest = min(p.ticket.message.received_at for p in batch)
            self.updates.observe(pred, count=len(batch), latency_s=now - oldest)
        results: list[Result] = []
        answered: list[tuple[str, str]] = []
        served: list[_Pending] = []
        rejected: list[_Pending] = []
        labels = pred.labels.tolist()
        confidences = pred.confidences.tolist()
        finite = pred.finite.tolist()
        unsure = self._triage(pred)
        ids = new_ids(len(batch))
        cases: list[Case] = []
        escalated: list[_Pending] = []
        for i, (p, label, conf, ok) in enumerate(
            zip(batch, labels, confidences, finite, strict=True)
        ):
            if not ok:
                self._reject(p.ticket.message, "non_finite_output", "the model produced NaN or Inf")
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
            self._finish(rejected)
        if cases:
            self._track(self._escalate(cases, escalated))
        if not results:
            return
        self.stats.results_out += len(results)
        for r in results:
            self._telemetry_observe(r.latency_ms)
        # Storing runs beside the next batch's inference. Results made while a commit is under
        # way go into the next message together: fewer, fuller messages to store and forward.
        self._to_store.append((results, answered, served))
        if self._store_task is None:
            task = asyncio.create_task(self._store_loop())
            self._store_task = task
            self._storing.add(task)
            task.add_done_callback(self._storing.discard)

    async def _store_loop(self) -> None:
        try:
            while self._to_store:
                results: list[Result] = []
                answered: list[tuple[str, str]] = []
                served: list[_Pending] = []
                # At most one outbox transaction's worth of bytes: the WAL stays within its
                # share of the outbox's bound at every instant (ADR 0075).
                size, max_size = 0, self.outbox.max_txn_bytes
                while self._to_store:
                    entry = _store_bytes(self._to_store[0])
                    if results and (
                        len(results) + len(self._to_store[0][0]) > self._max_results_per_message
                        or size + entry > max_size
                    ):
                        break
                    r, a, p = self._to_store.popleft()
                    size += entry
                    results += r
                    answered += a
                    served += p
                every = served
                served, lost = self._frames_taken_over(every)
                if lost:  # taken over while inference ran: the other process answers them
                    self._forget(lost)
                    gone = {id(x) for x in lost}
                    keep = [i for i, x in enumerate(every) if id(x) not in gone]
                    results = [results[i] for i in keep]
                    answered = [answered[i] for i in keep]
                    self.stats.results_out -= len(lost)
                    if not results:
                        continue
                try:
                    payload = encode_results(
                        ResultBatch(node=self.node_id, results=results),
                        as_json=self._results_as_json,
                    )
                except Exception as exc:  # a bug must not hold back every later acknowledgement
                    self._fail_results(served, "encode", exc)
                    continue
                self.stats.result_messages += 1
                await self._store(payload, answered, served)
        finally:
            self._store_task = None

    def _fail_results(self, frames: list[_Pending], stage: str, exc: Exception) -> None:
        """Results that could not be made or stored (a bug, a fault): their frames are
        dead-lettered (``internal_error``, naming the stage) and acknowledged, so one bad batch
        never holds back the acknowledgements behind it."""
        log.error("%d results lost at %s: %s: %s", len(frames), stage, type(exc).__name__, exc)
        why = f"{stage}: {type(exc).__name__}: {exc}"
        for p in frames:
            self._reject(p.ticket.message, "internal_error", why)
        self._finish(frames)

    def _telemetry_observe(self, latency_ms: float) -> None:
        with contextlib.suppress(ValueError):  # a clock step could make one negative
            self._window.observe_latency(latency_ms)

    async def _skip_answered(self, batch: list[_Pending]) -> list[_Pending]:
        """Acknowledge the frames answered already (their first result id stands); return the
        rest. Only those marked ``check`` are looked up, in one query."""
        known = {p.key for p in batch if p.check and p.key in self._answering}
        ask = [p.key for p in batch if p.check and p.key not in known]
        if ask:
            try:
                known.update(await self.outbox.answered_many(ask))
            except OutboxError as exc:
                log.warning("cannot look up %d frames (%s): answering them again", len(ask), exc)
        if not known:
            return batch
        fresh: list[_Pending] = []
        done: list[_Pending] = []
        for p in batch:
            if p.check and p.key in known:
                done.append(p)
            else:
                fresh.append(p)
        self.stats.frames_already_answered += len(done)
        self._finish(done)
        return fresh

    # ------------------------------------------------------------------ escalation
    def _triage(self, pred: Prediction) -> dict[int, EdgeVerdict]:
        """Rows of this batch the escalation policy sends to the cloud, with their summaries."""
        if self.escalator is None or pred.scores is None:
            return {}
        t = self.escalator.triage(self.model.name, pred.scores, self.model.output)
        return dict(zip(t.rows, t.verdicts, strict=True))

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)

    async def _escalate(self, cases: list[Case], escalated: list[_Pending]) -> None:
        """Hand unsure frames to the escalator. A frame is acknowledged once its case is in the
        journal (final result to come) or, if decided at once, once that result is stored
        (docs/adr/0031-escalation-acks.md)."""
        assert self.escalator is not None
        try:
            decided = await self.escalator.escalate(cases)
        except Exception as exc:  # journal trouble: answer now with the edge verdict
            log.error("escalation failed (%s): %d frames answered edge_fallback", exc, len(cases))
            decided = [
                Final(c.frame_key, msgspec.structs.replace(c.result, source="edge_fallback"))
                for c in cases
            ]
        now = {f.frame_key for f in decided}
        waiting = [p for p in escalated if p.key not in now]
        if waiting:
            ids = {c.frame_key: c.result.id for c in cases}
            for p in waiting:  # answered: a copy that comes before the final result is stored
                self._answering[p.key] = ids[p.key]
            self._finish(waiting)
        if decided:
            results = [f.result for f in decided]
            served = [p for p in escalated if p.key in now]
            try:
                payload = encode_results(
                    ResultBatch(node=self.node_id, results=results), as_json=self._results_as_json
                )
            except Exception as exc:  # a bug must not hold back every later acknowledgement
                self._fail_results(served, "encode", exc)
                return
            self.stats.results_out += len(results)
            self.stats.result_messages += 1
            answered = [(f.frame_key, f.result.id) for f in decided]
            await self._store(payload, answered, served)

    async def _store_finals(self, finals: list[Final]) -> None:
        """The escalator's final results (cloud, edge_fallback): durable in the outbox before
        the escalator lets go of them (their frames were acknowledged already)."""
        payload = encode_results(
            ResultBatch(node=self.node_id, results=[f.result for f in finals]),
            as_json=self._results_as_json,
        )
        record = Record(RESULT, self._results_topic, payload, items=len(finals))
        (record_id,) = await self.outbox.append(
            [record], [(f.frame_key, f.result.id) for f in finals]
        )
        for f in finals:
            self._answered.add(f.frame_key)
            self._answering.pop(f.frame_key, None)
        self.stats.results_out += len(finals)
        self.stats.result_messages += 1
        self.stats.results_stored += len(finals)
        self.results_forwarder.offer([record.stored(record_id, time.time())])

    async def _store(
        self, payload: bytes, answered: list[tuple[str, str]], served: list[_Pending]
    ) -> None:
        record = Record(RESULT, self._results_topic, payload, items=len(served))
        try:
            (record_id,) = await self.outbox.append([record], answered)
        except Exception as exc:  # OutboxError, or anything unexpected: degrade, never stall
            reason = "storage_full" if isinstance(exc, StorageFull) else "storage_error"
            if reason not in self.reasons:  # once per episode, not once per batch
                log.error("outbox write failed (%s): results go out without a durable copy", exc)
            self.status.set(reason, True)
            self._publish_direct(payload, served)
            return
        self.status.set("storage_full", False)
        self.status.set("storage_error", False)
        for key, _ in answered:  # before _finish lets go of them: no copy slips between
            self._answered.add(key)
        self.stats.results_stored += len(served)
        self._finish(served)
        self.results_forwarder.offer([record.stored(record_id, time.time())])

    def _publish_direct(self, payload: bytes, served: list[_Pending]) -> None:
        """Degraded path: the frames are acknowledged only once the broker has the results."""
        connection = self.uplink.connection
        fut = self.uplink.publish_nowait(self._results_topic, payload, qos=1)
        self._results_in_flight.add(fut)
        fut.add_done_callback(lambda f: self._results_settled(f, served, connection))

    def _results_settled(
        self, fut: asyncio.Future[None], served: list[_Pending], connection: int
    ) -> None:
        self._results_in_flight.discard(fut)
        exc = fut.exception()
        if exc is None:
            self.stats.results_acked += len(served)
            self._finish(served)
            return
        self.stats.publish_failures += 1
        if self.uplink.connected and self.uplink.connection == connection:
            # Refused by the broker (e.g. an ACL) or by the client while the link is up:
            # waiting would hold back every later acknowledgement, and retrying cannot help.
            log.error("results on %s not delivered: %s", self._results_topic, exc)
            self._finish(served)
        else:
            # Connection lost: leave the frames unacknowledged; the broker redelivers them.
            self._forget(served)

    def _store_event(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Dead letters and update events go through the outbox like results."""
        record = Record("event", topic, payload, retain=retain)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # another thread: the updater's boot, before the outbox is open
            self._offloop_events.append(record)
            if self._loop is not None and self._outbox_open:
                self._loop.call_soon_threadsafe(self._store_offloop_events)
            return
        task = asyncio.get_running_loop().create_task(self._store_event_async(record))
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)

    def _store_offloop_events(self) -> None:
        while self._offloop_events:
            record = self._offloop_events.popleft()
            self._store_event(record.topic, record.payload, retain=record.retain)

    async def _store_event_async(self, record: Record) -> None:
        # Storage trouble is reported by the results and telemetry paths; send it anyway.
        await self._via_outbox(record)

    async def _via_outbox(self, record: Record) -> Exception | None:
        """Append one record and hand it to the forwarder. If the outbox cannot take it, publish
        it directly (no durable copy) and return why."""
        try:
            (record_id,) = await self.outbox.append([record])
        except Exception as exc:
            fut = self.uplink.publish_nowait(
                record.topic, record.payload, qos=record.qos, retain=record.retain
            )
            fut.add_done_callback(lambda f: f.exception())
            return exc
        self.forwarder.offer([record.stored(record_id, time.time())])
        return None

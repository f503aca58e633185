"""The node's updater: signed keys, manifests and commands in; verified models swapped in.

``UpdateManager`` is an async context manager the node enters beside its other resources. It
owns one MQTT session of its own, persistent (``updates.command_session_expiry_s``), so QoS 1
commands sent while the node is away wait for it at the broker; the retained key set and
manifest are subscribed again on every connect, so the broker resends them too (the manifest
is desired state, not an event). Its loops, in one TaskGroup: keys + manifests; the command
journal's writer; the commands. It talks to the node through three things only:

* :meth:`boot` (before the node loads its model): finish or abandon what a crash interrupted
  and load the model the persisted state says is active (``None``: the configured model);
* ``swap(new) -> old``: the node serves ``new`` from its next batch; the manager keeps ``old``
  warm until probation ends (an instant rollback), then closes it;
* :meth:`observe`: the node's per-batch outcome, the probation window's evidence.

This module is the wiring; each promise lives in its own module:

* :mod:`.boot`      what the node does at start with the pending, active and previous state
* :mod:`.held`      the trusted key set and update state in memory, each change written first
* :mod:`.verdicts`  which manifests and key sets were judged already, and how
* :mod:`.judging`   verifying a manifest or key set (pure)
* :mod:`.install`   download → validate → swap → probation → committed | rolled back
* :mod:`.commands`  operator commands: verified, recorded, acknowledged, run once, in order
* :mod:`.events`    every step and outcome reported as an update event
* :mod:`.rejects`   rejections on the control topics: counted, logged, reported capped
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from edge_node.hardware import NodeHardware
from edge_node.updates import boot
from edge_node.updates.commands import CommandHandler, Commands
from edge_node.updates.config import UpdatesConfig
from edge_node.updates.errors import StateError, StepFailed
from edge_node.updates.events import UpdateEvents
from edge_node.updates.files import sha256_file
from edge_node.updates.held import Held
from edge_node.updates.install import Installer, Swap
from edge_node.updates.journal import CommandJournal
from edge_node.updates.judging import judge_manifest
from edge_node.updates.rejects import ControlRejects, Kind, Rejection
from edge_node.updates.state import Installed, StateStore
from edge_node.updates.stats import UpdateStats
from edge_node.updates.verdicts import VerdictMemory
from edgewise.mqtt import (
    Conflict,
    ConnectInfo,
    Inbound,
    MqttConfig,
    MqttSession,
    max_packet_for,
)
from edgewise.releases import Reason, Rejected, envelope_id, verify_key_set
from edgewise.releases.events import EventKind
from edgewise.releases.wire import MAX_ENVELOPE_BYTES
from edgewise.serving.model import Prediction, ServedModel
from schemas import Topics

log = logging.getLogger(__name__)

__all__ = ["CommandHandler", "DeadLetterSink", "Swap", "UpdateManager", "UpdateStats"]

DeadLetterSink = Callable[[str, bytes, str, str], None]
"""``(topic, payload, reason, detail)``: the node's dead-letter publisher."""

_EVENT_OF: dict[Kind, EventKind] = {
    "command": "command_rejected",
    "manifest": "rejected",
    "keys": "keys_rejected",
}


class UpdateManager:
    def __init__(
        self,
        config: UpdatesConfig,
        *,
        node_id: str,
        hardware: NodeHardware,
        mqtt: MqttConfig,
        topics: Topics,
        state_dir: Path,
        model_name: str,
        model_release: int,
        model_path: Path,
        swap: Swap | None = None,
        commands: Mapping[str, CommandHandler] | None = None,
        clock: Callable[[], float] = time.time,
        publish_event: Callable[[str, bytes], None] | None = None,
        dead_letter: DeadLetterSink | None = None,
        conflict: Conflict | None = None,
    ) -> None:
        """``publish_event(topic, payload)``, when given, takes every event (retained, QoS 1)
        instead of this manager's own connection: the node stores them in its outbox.
        ``dead_letter``, when given, reports garbage on chunk topics (rate-capped);
        ``conflict``: the node's takeover count, shared by its connections (ADR 0073)."""
        root = config.root_key_bytes()
        if root is None:
            raise ValueError("updates.root_key is not set: the node has no root key to trust")
        # Own sessions need their own client ids, whatever mqtt.client_id says.
        mqtt = mqtt.model_copy(update={"client_id": ""})
        self._dead_letter = dead_letter
        self.config = config
        self.node_id = node_id
        self.hardware = hardware
        self.hw_class = hardware.name
        self.topics = topics
        self._root = root
        self._model_name = model_name
        self._model_path = model_path
        self.swap = swap
        self.commands: dict[str, CommandHandler] = dict(commands or {})
        self._clock = clock
        self.store = StateStore(state_dir)
        self.held = Held(
            self.store, model_name=model_name, model_release=model_release, clock=clock
        )
        self.verdicts = VerdictMemory(self.store, clock)
        self._manifests: dict[str, bytes] = {}
        self._key_payload: bytes | None = None
        self._wake = asyncio.Event()
        self.rejects = ControlRejects(
            self._report_rejection, events_per_s=config.rejection_events_max_per_s
        )
        self._stack: contextlib.AsyncExitStack | None = None
        self.session = MqttSession(
            # Persistent: QoS 1 commands sent while the node is away wait at the broker.
            mqtt.model_copy(update={"session_expiry_s": config.command_session_expiry_s}),
            client_id=f"edgewise-node-{node_id}-updates",
            on_message=self._on_message,
            on_connect=self._on_connect,
            persistent=config.command_session_expiry_s > 0,
            resubscribe=True,  # the class, model or topics may have changed since
            conflict=conflict,
            # Signed envelopes (manifests, key sets, commands): larger ones are refused and
            # counted up to the overhead beyond; the broker drops what is larger still.
            max_packet_bytes=max_packet_for(MAX_ENVELOPE_BYTES),
        )
        self.events = UpdateEvents(
            node_id=node_id,
            model_name=model_name,
            topics=topics,
            session=self.session,
            running=lambda: self.held.running_release,
            clock=clock,
            publish_event=publish_event,
        )
        self.stats = UpdateStats()
        self.state_changes: list[str] = self.events.kinds
        """Every event kind this run reported, in order (for tests and `describe`)."""
        self.busy = False
        self.installer = Installer(
            config,
            held=self.held,
            memory=self.verdicts,
            events=self.events,
            rejects=self.rejects,
            stats=self.stats,
            hardware=hardware,
            mqtt=mqtt,
            topics=topics,
            node_id=node_id,
            swap=lambda: self.swap,
            clock=clock,
            conflict=conflict,
        )
        self.journal = CommandJournal(self.store.root / "commands.db")
        self.command_runner = Commands(
            config,
            journal=self.journal,
            session=self.session,
            handlers=self.commands,
            node_id=node_id,
            hw_class=self.hw_class,
            keys=lambda: self.held.keys,
            events=self.events,
            rejects=self.rejects,
            stats=self.stats,
            clock=clock,
        )

    # ------------------------------------------------------------------ boot (sync, before serving)
    @property
    def floor(self) -> int:
        return self.held.floor

    @property
    def active(self) -> Installed | None:
        return self.held.active

    def boot(self) -> ServedModel | None:
        """Recover from whatever a crash interrupted; load the active artifact (None: serve the
        configured model). Raises :class:`StateError` if the state directory is unusable."""
        store = self.store
        store.open()
        self.held.keys = boot.load_keys(store, self._root)
        self.held.state = store.state()
        self.verdicts.load()
        self.command_runner.open(self.verdicts.seen.commands)
        boot.recover(self.held, self.verdicts, self.events)
        self.held.prune()
        return boot.load_active(self.held, self.events, self.hardware)

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Self:
        if not self.journal.is_open:  # boot() was not called (the node was handed its model)
            self.store.open()
            self.command_runner.open(self.verdicts.seen.commands)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.session)
            t = self.topics
            self.session.subscribe(t.fleet_keys(), qos=1)
            self.session.subscribe(t.fleet_model(self.hw_class, self._model_name), qos=1)
            self.session.subscribe(t.cmd(self.node_id), qos=1)
            self.session.subscribe(t.fleet_cmd(self.hw_class), qos=1)
            tasks = await stack.enter_async_context(asyncio.TaskGroup())
            runner = self.command_runner
            loops = [
                tasks.create_task(self._manifest_loop(), name="updates-manifests"),
                tasks.create_task(runner.record_loop(), name="updates-command-journal"),
                tasks.create_task(runner.run_loop(), name="updates-commands"),
            ]
            stack.callback(lambda: [x.cancel() for x in loops])
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            await self._stack.__aexit__(None, None, None)
        self.journal.close()

    # ------------------------------------------------------------------ inbound
    def _on_message(self, msg: Inbound) -> None:
        t = self.topics
        if msg.topic in (t.cmd(self.node_id), t.fleet_cmd(self.hw_class)):
            self.command_runner.take(msg)  # acknowledged there, once recorded or refused
            return
        # Key sets and manifests are state, held in memory until judged: acknowledged now (the
        # retained copy comes again on the next connect).
        self.session.ack(msg)
        if msg.topic == t.fleet_keys():
            self._key_payload = msg.payload
            self._wake.set()
        else:
            self._manifests[msg.topic] = msg.payload
            self._wake.set()

    async def _on_connect(self, info: ConnectInfo) -> None:
        self.verdicts.forget_transient()
        if info.session_present and self.session.stats.connects > 1:
            # The broker kept the session and its subscriptions, so it would not send the
            # retained key set and manifest again: subscribing anew makes it.
            t = self.topics
            self.session.subscribe(t.fleet_keys(), qos=1)
            self.session.subscribe(t.fleet_model(self.hw_class, self._model_name), qos=1)
        self.events.flush()

    # ------------------------------------------------------------------ keys and manifests
    async def _manifest_loop(self) -> None:
        while True:
            await self._wake.wait()
            # The retained key set and manifest arrive together after a connect: let the burst
            # land so a manifest is not judged against keys about to be replaced.
            await asyncio.sleep(0.1)
            self._wake.clear()
            if self._key_payload is not None:
                payload, self._key_payload = self._key_payload, None
                self._handle_keys(payload)
            for payload in list(self._manifests.values()):
                if payload:
                    await self._handle_manifest(payload)

    def _handle_keys(self, payload: bytes) -> None:
        if not payload:
            return
        held = self.held
        try:
            verdict = verify_key_set(
                payload, root_public=self._root, held=held.keys, now=self._clock()
            )
        except Rejected as exc:
            if self.verdicts.first_key_rejection(envelope_id(payload)):
                self._rejected("keys", self.topics.fleet_keys(), exc, payload)
            return
        if verdict.status == "same":
            return
        try:
            self.store.save_key_set(payload)
        except StateError as exc:
            log.error("cannot store the new key set: %s", exc)
            return
        held.keys = verdict.key_set
        self.events.report("keys_updated", ref=str(verdict.key_set.version))

    async def _handle_manifest(self, payload: bytes) -> None:
        manifest_id = envelope_id(payload)
        held = self.held
        if self.verdicts.already_judged(manifest_id, held.key_version):
            self.stats.manifests_skipped += 1
            return
        self.stats.manifests_verified += 1
        active = held.active
        try:
            manifest = judge_manifest(
                payload,
                keys=held.keys,
                node_id=self.node_id,
                hardware=self.hardware,
                model_name=self._model_name,
                floor=held.floor,
                installed_sha256=active.sha256 if active else self._config_sha256(),
                max_artifact_bytes=self.config.max_artifact_bytes,
                now=self._clock(),
            )
        except Rejected as exc:
            self._reject(manifest_id, None, exc.reason, exc.detail)
            return
        self.verdicts.handled(manifest_id)
        if manifest is None:  # what the node runs already
            return
        self.busy = True
        try:
            await self.installer.install(manifest, manifest_id)
        except StepFailed as exc:
            self.store.save_pending(None)
            self._reject(manifest_id, manifest.release, exc.reason, exc.detail)
        except StateError as exc:
            self.store.save_pending(None)
            self._reject(manifest_id, manifest.release, Reason.STORAGE_ERROR, str(exc))
        finally:
            self.busy = False

    def _config_sha256(self) -> str | None:
        try:
            return sha256_file(self._model_path)
        except OSError:
            return None

    # ------------------------------------------------------------------ rejections
    def _reject(self, manifest_id: str, release: int | None, reason: Reason, detail: str) -> None:
        self.verdicts.refused(manifest_id, reason, self.held.key_version)
        topic = self.topics.fleet_model(self.hw_class, self._model_name)
        self.rejects.reject(
            Rejection("manifest", topic, reason, detail, ref=manifest_id, release=release)
        )

    def _rejected(self, kind: Kind, topic: str, exc: Rejected, payload: bytes = b"") -> None:
        self.rejects.reject(Rejection(kind, topic, exc.reason, exc.detail, payload))

    def _report_rejection(self, r: Rejection) -> None:
        """A rejection the rate cap lets through: an event (its log line is written)."""
        if r.kind == "chunk":
            if self._dead_letter is not None:
                self._dead_letter(r.topic, r.payload, r.reason.value, r.detail)
            return
        self.events.report(
            _EVENT_OF[r.kind],
            release=r.release,
            reason=r.reason,
            detail=r.detail,
            ref=r.ref,
            quiet=True,
        )

    # ------------------------------------------------------------------ the node's side
    def observe(self, pred: Prediction | None, *, count: int, latency_s: float) -> None:
        """One batch's outcome: ``pred`` None means the batch failed (probation evidence)."""
        self.installer.observe(pred, count=count, latency_s=latency_s)

    def describe(self) -> dict[str, object]:
        keys = self.held.keys
        return {
            "release": self.held.running_release,
            "key_set_version": keys.version if keys else None,
            "busy": self.busy,
            "in_probation": self.installer.probation is not None,
            "commands_waiting": self.command_runner.in_hand,
            "control_rejects": dict(self.rejects.counts),
        }

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

The update state machine (persisted, see :mod:`edge_node.updates.state`)::

    idle ─▶ downloading ─▶ verified ─▶ validating ─▶ swapping ═▶ probation ─▶ committed
              │               │            │            │           └─▶ rolled_back
              └───────────────┴────────────┴────────────┴─▶ rejected (reason)

``═▶`` is the one atomic write that activates (state.json); a crash before it leaves the old
model active and the update is reported ``abandoned`` (the retained manifest then restarts it,
the download resuming from its chunks); a crash after it, during probation, is a failed
probation: the node boots the previous model and reports ``rolled_back``.

Commands (docs/adr/0073-client-id-conflict.md has the why): verified on receipt (garbage never
takes a place in the queue), recorded in the journal (:mod:`edge_node.updates.journal`, fsynced)
and only then acknowledged to the broker, run one at a time in the order received, marked done.
A crash between receipt and execution runs the command once after the restart; a copy that
comes again runs no more. Rejections on the control topics are counted, logged and reported at
a capped rate (:mod:`edge_node.updates.rejects`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from edge_node.errors import ModelLoadError, ModelRefused
from edge_node.hardware import NodeHardware, load_model
from edge_node.updates.config import UpdatesConfig
from edge_node.updates.crashpoints import crashpoint
from edge_node.updates.download import ChunkDownload
from edge_node.updates.errors import StateError, StepFailed
from edge_node.updates.files import sha256_file
from edge_node.updates.journal import CommandJournal, Entry
from edge_node.updates.probation import ProbationWindow
from edge_node.updates.rejects import ControlRejects, Kind, Rejection
from edge_node.updates.state import (
    Installed,
    NodeState,
    Pending,
    Probation,
    Seen,
    StateStore,
    Step,
)
from edge_node.updates.validate import validate
from edgewise.files import replace_durably
from edgewise.mqtt import (
    Conflict,
    ConnectInfo,
    Inbound,
    MqttConfig,
    MqttSession,
    max_packet_for,
)
from edgewise.releases import (
    TRUST_DEPENDENT,
    Command,
    KeySet,
    Manifest,
    Reason,
    Rejected,
    UpdateEvent,
    decode_document,
    decode_envelope,
    encode_event,
    envelope_id,
    verify_command,
    verify_key_set,
    verify_manifest,
)
from edgewise.releases.events import EventKind
from edgewise.releases.wire import MAX_ENVELOPE_BYTES
from edgewise.serving.model import Prediction, ServedModel
from schemas import Topics, log_text, new_id

log = logging.getLogger(__name__)

Swap = Callable[[ServedModel], ServedModel]
TRANSIENT = frozenset({Reason.DOWNLOAD_TIMEOUT, Reason.STORAGE_ERROR})
CommandHandler = Callable[[Mapping[str, str]], object]
DeadLetterSink = Callable[[str, bytes, str, str], None]
"""``(topic, payload, reason, detail)``: the node's dead-letter publisher."""
_HANDLED_KEYS_MAX = 1024


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What came of a command: the event that reports it."""

    kind: EventKind
    reason: Reason | None
    detail: str


_EVENT_OF: dict[Kind, EventKind] = {
    "command": "command_rejected",
    "manifest": "rejected",
    "keys": "keys_rejected",
}


@dataclass(slots=True)
class UpdateStats:
    manifests_verified: int = 0
    manifests_skipped: int = 0
    """Seen again (retained, on every connect) and already judged: not verified again."""
    downloads: int = 0
    """Chunk downloads started (a session subscribed to ``models/{sha256}/+``)."""
    commands_run: int = 0
    """Commands whose turn came (ran, failed, or refused then, e.g. expired)."""
    commands_again: int = 0
    """Copies of a command already recorded and not yet run (a redelivery): acknowledged."""


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
        self._conflict = conflict
        self.config = config
        self.node_id = node_id
        self.hardware = hardware
        self.hw_class = hardware.name
        self.topics = topics
        self._mqtt = mqtt
        self._root = root
        self._model_name = model_name
        self._model_release = model_release
        self._model_path = model_path
        self.swap = swap
        self.commands: dict[str, CommandHandler] = dict(commands or {})
        self._clock = clock
        self.store = StateStore(state_dir)
        self._keys: KeySet | None = None
        self._state = NodeState()
        self._seen = Seen()
        self._manifests: dict[str, bytes] = {}
        self._key_payload: bytes | None = None
        self._wake = asyncio.Event()
        self.journal = CommandJournal(self.store.root / "commands.db")
        self._to_record: list[tuple[Command, Inbound]] = []
        """Verified commands waiting for their journal write (then their acknowledgement)."""
        self._record_wake = asyncio.Event()
        self._waiting: collections.deque[Entry] = collections.deque()
        """Commands recorded and not yet run, in the order received."""
        self._run_wake = asyncio.Event()
        self._in_hand: set[str] = set()
        """Ids of the commands in ``_to_record`` and ``_waiting``: the bounded queue."""
        self._done_ids: set[str] = set()
        """Ids of the commands that ran (journal and, from before it, seen.json)."""
        self.rejects = ControlRejects(
            self._report_rejection, events_per_s=config.rejection_events_max_per_s
        )
        self._handled_keys: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._handled: set[str] = set()
        self._transient: set[str] = set()
        """Refused for a passing cause (a timeout, the disk): tried again after a reconnect."""
        self._events: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=256)
        self._publish_event = publish_event
        self._probation: ProbationWindow | None = None
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
        self.stats = UpdateStats()
        self.state_changes: list[str] = []
        """Every event kind this run reported, in order (for tests and `describe`)."""
        self.busy = False

    # ------------------------------------------------------------------ boot (sync, before serving)
    @property
    def floor(self) -> int:
        held = self._state.floor.get(self._model_name, 0)
        return max(held, self._model_release)

    @property
    def active(self) -> Installed | None:
        return self._state.active

    def boot(self) -> ServedModel | None:
        """Recover from whatever a crash interrupted; load the active artifact (None: serve the
        configured model). Raises :class:`StateError` if the state directory is unusable."""
        store = self.store
        store.open()
        self._keys = self._load_keys()
        self._state = store.state()
        self._seen = store.seen()
        self._open_journal()
        state = self._state
        if state.probation is not None:
            failed = state.active
            self._event(
                "rolled_back",
                release=state.probation.release,
                reason=Reason.CRASHED_IN_PROBATION,
                detail="the node stopped during probation; back on the previous model",
                ref=state.probation.manifest_id,
                running=state.previous.release if state.previous else self._model_release,
            )
            self._remember_rejection(state.probation.manifest_id, Reason.CRASHED_IN_PROBATION)
            self._set_state(
                NodeState(active=state.previous, previous=None, floor=state.floor, probation=None)
            )
            log.warning(
                "update to release %s interrupted in probation: rolled back",
                failed and failed.release,
            )
        pending = store.pending()
        if pending is not None:
            self._event(
                "abandoned",
                release=pending.release,
                detail=f"interrupted at step {pending.step}; the retained manifest restarts it",
                ref=pending.manifest_id,
            )
            store.save_pending(None)
        self._prune()
        return self._load_active()

    def _open_journal(self) -> None:
        """Open the command journal; the commands recorded and not run go first (in order)."""
        journal = self.journal
        journal.open()
        journal.prune(self._clock())
        self._done_ids = journal.done_ids() | set(self._seen.commands)
        waiting = journal.waiting()
        self._waiting = collections.deque(waiting)
        self._in_hand = {e.id for e in waiting}
        if waiting:
            log.info("%d commands received before the restart wait to run", len(waiting))

    def _load_keys(self) -> KeySet | None:
        data = self.store.key_set_bytes()
        if data is None:
            return None
        try:
            # Stored only after verification; checked again against the root (not the clock:
            # expiry is judged when the keys are used).
            verify_key_set(data, root_public=self._root, held=None, now=0.0)
            return decode_document(decode_envelope(data), KeySet)
        except Rejected as exc:
            log.error("the stored key set does not verify (%s): holding none", exc)
            return None

    def _load_active(self) -> ServedModel | None:
        active = self._state.active
        while active is not None:
            path = self.store.artifact_path(active.sha256, active.format)
            try:
                if sha256_file(path) != active.sha256:
                    raise ModelLoadError(f"{path} does not hash to {active.sha256[:16]}…")
                served = load_model(
                    self.hardware,
                    path,
                    name=active.name,
                    release=active.release,
                    output=active.output_kind,
                )
                served.thresholds = dict(active.thresholds)
                return served
            except (OSError, ModelLoadError) as exc:
                previous = self._state.previous
                log.error("active release %d unusable (%s): falling back", active.release, exc)
                # E.g. the node's hardware_class changed to one that cannot run it.
                self._event(
                    "rolled_back",
                    release=active.release,
                    reason=Reason(exc.reason)
                    if isinstance(exc, ModelRefused)
                    else Reason.LOAD_FAILED,
                    detail=str(exc)[:1000],
                    ref=active.manifest_id,
                    running=previous.release if previous else self._model_release,
                )
                self._set_state(NodeState(active=previous, previous=None, floor=self._state.floor))
                active = previous
        return None

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Self:
        if not self.journal.is_open:  # boot() was not called (the node was handed its model)
            self.store.open()
            self._open_journal()
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.session)
            t = self.topics
            self.session.subscribe(t.fleet_keys(), qos=1)
            self.session.subscribe(t.fleet_model(self.hw_class, self._model_name), qos=1)
            self.session.subscribe(t.cmd(self.node_id), qos=1)
            self.session.subscribe(t.fleet_cmd(self.hw_class), qos=1)
            tasks = await stack.enter_async_context(asyncio.TaskGroup())
            loops = [
                tasks.create_task(self._manifest_loop(), name="updates-manifests"),
                tasks.create_task(self._record_loop(), name="updates-command-journal"),
                tasks.create_task(self._command_loop(), name="updates-commands"),
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
            self._take_command(msg)  # acknowledged there, once recorded or refused
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
        self._transient.clear()
        if info.session_present and self.session.stats.connects > 1:
            # The broker kept the session and its subscriptions, so it would not send the
            # retained key set and manifest again: subscribing anew makes it.
            t = self.topics
            self.session.subscribe(t.fleet_keys(), qos=1)
            self.session.subscribe(t.fleet_model(self.hw_class, self._model_name), qos=1)
        self._flush_events()

    # ------------------------------------------------------------------ events
    def _event(
        self,
        kind: EventKind,
        *,
        release: int | None = None,
        reason: Reason | None = None,
        detail: str = "",
        ref: str | None = None,
        running: int | None = None,
        quiet: bool = False,
    ) -> None:
        """Report an event (``quiet``: its log line was written already, rate-capped)."""
        if running is None:
            running = self._state.active.release if self._state.active else self._model_release
        event = UpdateEvent(
            id=new_id(),
            node=self.node_id,
            ts=self._clock(),
            kind=kind,
            model=self._model_name,
            release=release,
            running_release=running,
            reason=reason.value if reason else None,
            detail=detail[:1024],
            ref=ref,
        )
        self.state_changes.append(kind if reason is None else f"{kind}:{reason.value}")
        if not quiet:
            log.info(
                "update event %s release=%s reason=%s %s", kind, release, reason, log_text(detail)
            )
        topic, payload = self.topics.events(self.node_id), encode_event(event)
        if self._publish_event is not None:
            self._publish_event(topic, payload)
            return
        self._events.append((topic, payload))
        self._flush_events()

    def _flush_events(self) -> None:
        while self._events and self.session.connected:
            topic, payload = self._events[0]
            fut = self.session.publish_nowait(topic, payload, qos=1, retain=True)
            if fut.done() and fut.exception() is not None:
                return  # not connected after all: kept for the next connect
            self._events.popleft()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    # ------------------------------------------------------------------ state
    def _set_state(self, state: NodeState) -> None:
        self.store.save_state(state)
        self._state = state

    def _set_pending(self, manifest_id: str, release: int, step: Step) -> None:
        self.store.save_pending(
            Pending(manifest_id=manifest_id, release=release, step=step, started_at=self._clock())
        )

    def _remember_rejection(self, manifest_id: str, reason: Reason) -> None:
        version = self._keys.version if self._keys else 0
        self._seen.rejected[manifest_id] = (reason.value, version)
        try:
            self.store.save_seen(self._seen, self._clock())
        except StateError as exc:
            log.error("cannot remember a rejection: %s", exc)

    def _already_judged(self, manifest_id: str) -> bool:
        if manifest_id in self._handled or manifest_id in self._transient:
            return True
        got = self._seen.rejected.get(manifest_id)
        if got is None:
            return False
        reason, version = got
        still = self._keys.version if self._keys else 0
        return not (Reason(reason) in TRUST_DEPENDENT and version != still)

    def _prune(self) -> None:
        keep = {i.sha256 for i in (self._state.active, self._state.previous) if i is not None}
        self.store.prune_artifacts(keep)

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
        try:
            verdict = verify_key_set(
                payload, root_public=self._root, held=self._keys, now=self._clock()
            )
        except Rejected as exc:
            key = envelope_id(payload)
            if key not in self._handled_keys:  # the retained copy comes on every connect
                self._handled_keys[key] = None
                if len(self._handled_keys) > _HANDLED_KEYS_MAX:
                    self._handled_keys.popitem(last=False)
                self._rejected("keys", self.topics.fleet_keys(), exc, payload)
            return
        if verdict.status == "same":
            return
        try:
            self.store.save_key_set(payload)
        except StateError as exc:
            log.error("cannot store the new key set: %s", exc)
            return
        self._keys = verdict.key_set
        self._event("keys_updated", ref=str(verdict.key_set.version))

    async def _handle_manifest(self, payload: bytes) -> None:
        manifest_id = envelope_id(payload)
        if self._already_judged(manifest_id):
            self.stats.manifests_skipped += 1
            return
        self.stats.manifests_verified += 1
        active = self._state.active
        try:
            verdict = verify_manifest(
                payload,
                keys=self._keys,
                node_id=self.node_id,
                hw_class=self.hw_class,
                floor=self.floor,
                installed_sha256=active.sha256 if active else self._config_sha256(),
                now=self._clock(),
            )
            if verdict.status == "current":
                self._handled.add(manifest_id)
                return
            if verdict.manifest.name != self._model_name:
                raise Rejected(Reason.MALFORMED, f"model {verdict.manifest.name!r} on this topic")
            self._check_class(verdict.manifest)
            if verdict.manifest.size > self.config.max_artifact_bytes:
                raise Rejected(
                    Reason.SIZE_EXCEEDED,
                    f"{verdict.manifest.size} bytes > updates.max_artifact_bytes",
                )
        except Rejected as exc:
            self._reject(manifest_id, None, exc.reason, exc.detail)
            return
        self._handled.add(manifest_id)
        self.busy = True
        try:
            await self._apply(verdict.manifest, manifest_id)
        except StepFailed as exc:
            self.store.save_pending(None)
            self._reject(manifest_id, verdict.manifest.release, exc.reason, exc.detail)
        except StateError as exc:
            self.store.save_pending(None)
            self._reject(manifest_id, verdict.manifest.release, Reason.STORAGE_ERROR, str(exc))
        finally:
            self.busy = False

    def _check_class(self, m: Manifest) -> None:
        """Can the node's hardware class run this release? Judged from the signed manifest,
        before any chunk is fetched; raises :class:`Rejected`."""
        refusal = self.hardware.refuse_release(
            m.format, m.size, m.input.shape, f"release {m.release} of {m.name}"
        )
        if refusal is not None:
            raise Rejected(Reason(refusal.reason), refusal.detail)

    def _config_sha256(self) -> str | None:
        try:
            return sha256_file(self._model_path)
        except OSError:
            return None

    def _reject(self, manifest_id: str, release: int | None, reason: Reason, detail: str) -> None:
        self._handled.discard(manifest_id)
        if reason in TRANSIENT:
            self._transient.add(manifest_id)
        else:
            self._remember_rejection(manifest_id, reason)
        topic = self.topics.fleet_model(self.hw_class, self._model_name)
        self.rejects.reject(
            Rejection("manifest", topic, reason, detail, ref=manifest_id, release=release)
        )

    # ------------------------------------------------------------------ rejections
    def _rejected(self, kind: Kind, topic: str, exc: Rejected, payload: bytes = b"") -> None:
        self.rejects.reject(Rejection(kind, topic, exc.reason, exc.detail, payload))

    def _report_rejection(self, r: Rejection) -> None:
        """A rejection the rate cap lets through: an event (its log line is written)."""
        if r.kind == "chunk":
            if self._dead_letter is not None:
                self._dead_letter(r.topic, r.payload, r.reason.value, r.detail)
            return
        self._event(
            _EVENT_OF[r.kind],
            release=r.release,
            reason=r.reason,
            detail=r.detail,
            ref=r.ref,
            quiet=True,
        )

    async def _apply(self, m: Manifest, manifest_id: str) -> None:
        store = self.store
        self._set_pending(manifest_id, m.release, "downloading")
        self._event("downloading", release=m.release, ref=manifest_id, detail=f"{m.size} bytes")
        staged = store.staged_path(m.sha256, m.format)
        local = store.artifact_path(m.sha256, m.format)
        if local.exists() and await asyncio.to_thread(sha256_file, local) == m.sha256:
            staged = local  # e.g. a rollback release pointing at the previous artifact
        else:
            self.stats.downloads += 1
            download = ChunkDownload(
                m,
                mqtt=self._mqtt,
                topics=self.topics,
                client_id=f"edgewise-node-{self.node_id}-download",
                partial_root=store.partial,
                staged=staged,
                on_garbage=lambda topic, payload, detail: self.rejects.reject(
                    Rejection("chunk", topic, Reason.MALFORMED, detail, payload)
                ),
                conflict=self._conflict,
            )
            try:
                staged = await download.fetch(self.config.download_timeout_s)
            except StepFailed as exc:
                if exc.reason is not Reason.DOWNLOAD_TIMEOUT:
                    download.discard()
                raise
            except OSError as exc:
                raise StepFailed(Reason.STORAGE_ERROR, str(exc)) from None
        self._set_pending(manifest_id, m.release, "verified")
        self._event("verified", release=m.release, ref=manifest_id)
        self._set_pending(manifest_id, m.release, "validating")
        self._event("validating", release=m.release, ref=manifest_id)
        try:
            model = await asyncio.to_thread(validate, staged, m, hardware=self.hardware)
        except StepFailed:
            if staged != local:
                staged.unlink(missing_ok=True)
            raise
        try:
            self._set_pending(manifest_id, m.release, "swapping")
            crashpoint("updates.swap.before_move")
            if staged != local:
                await asyncio.to_thread(_move, staged, local)
            crashpoint("updates.swap.after_move")
            # The model serves from the file it was validated from: reload from its final place
            # only matters for `path` (recycling); the session itself is the validated one.
            model.path = str(local)
            model.thresholds = dict(m.thresholds)
            new = Installed(
                name=m.name,
                release=m.release,
                sha256=m.sha256,
                output_kind=m.output_kind,
                path=str(local),
                manifest_id=manifest_id,
                thresholds=dict(m.thresholds),
                format=m.format,
            )
            old_installed = self._state.active
            activated = NodeState(
                active=new,
                previous=old_installed,
                floor={**self._state.floor, m.name: m.release},
                probation=Probation(
                    manifest_id=manifest_id, release=m.release, started_at=self._clock()
                ),
            )
            self._set_state(activated)  # the one atomic write that activates
            crashpoint("updates.swap.after_state")
            store.save_pending(None)
        except BaseException:
            model.close()
            raise
        old_model = self._swap_in(model)
        self._event("activated", release=m.release, ref=manifest_id)
        await self._probation_window(m, manifest_id, model, old_model, old_installed)

    def _swap_in(self, model: ServedModel) -> ServedModel | None:
        if self.swap is None:
            return None
        return self.swap(model)

    async def _probation_window(
        self,
        m: Manifest,
        manifest_id: str,
        model: ServedModel,
        old_model: ServedModel | None,
        old_installed: Installed | None,
    ) -> None:
        c = self.config
        window = ProbationWindow(c)
        self._probation = window
        started = time.monotonic()
        try:
            while True:
                await asyncio.sleep(min(0.2, max(0.01, c.probation_s / 10)))
                elapsed = time.monotonic() - started
                if window.enough and window.verdict() is not None:
                    break  # failing already: no need to wait the window out
                if elapsed >= c.probation_s and window.enough:
                    break
                if elapsed >= c.probation_max_s:
                    break
        finally:
            self._probation = None
        problem = window.verdict()
        if problem is None:
            self._set_state(
                NodeState(
                    active=self._state.active, previous=old_installed, floor=self._state.floor
                )
            )
            self._prune()
            if old_model is not None:
                old_model.close()
            self._event(
                "committed",
                release=m.release,
                ref=manifest_id,
                detail=f"{window.inferences} inferences in probation",
            )
            return
        # Roll back: the previous session is still warm.
        if old_model is not None:
            self._swap_in(old_model)
        model.close()
        self._set_state(
            NodeState(active=old_installed, previous=None, floor=self._state.floor, probation=None)
        )
        self._remember_rejection(manifest_id, Reason.PROBATION_FAILED)
        self._prune()
        self._event(
            "rolled_back",
            release=m.release,
            reason=Reason.PROBATION_FAILED,
            detail=problem,
            ref=manifest_id,
        )

    # ------------------------------------------------------------------ probation feed
    def observe(self, pred: Prediction | None, *, count: int, latency_s: float) -> None:
        """One batch's outcome: ``pred`` None means the batch failed."""
        window = self._probation
        if window is None:
            return
        if pred is None:
            window.observe(count=count, failed=count)
            return
        finite = pred.finite
        bad = int(count - int(finite.sum()))
        window.observe(
            count=count,
            non_finite=bad,
            confidence_sum=float(pred.confidences[finite].sum()),
            latency_s=latency_s,
        )

    # ------------------------------------------------------------------ commands
    def _take_command(self, msg: Inbound) -> None:
        """Verify a command on receipt; queue it for the journal, or refuse it (acknowledged,
        counted, reported at a capped rate). Only verified commands take a place in the
        bounded queue, so garbage can never crowd out an operator's command."""
        topic = msg.topic
        if msg.retain:
            self.session.ack(msg)  # commands are events: a retained one would run each connect
            return
        try:
            command = verify_command(
                msg.payload,
                keys=self._keys,
                node_id=self.node_id,
                hw_class=self.hw_class,
                seen_ids=self._done_ids,
                now=self._clock(),
            )
        except Rejected as exc:
            self.session.ack(msg)
            self._rejected("command", topic, exc, msg.payload)
            return
        if command.id in self._in_hand:  # recorded (or being recorded), not run yet: a copy
            self.stats.commands_again += 1
            self.session.ack(msg)
            return
        if len(self._in_hand) >= self.config.command_queue_max:
            self.session.ack(msg)
            self.rejects.reject(
                Rejection(
                    "command",
                    topic,
                    Reason.QUEUE_FULL,
                    f"{len(self._in_hand)} commands wait already (updates.command_queue_max)",
                    msg.payload,
                    ref=command.id,
                )
            )
            return
        self._in_hand.add(command.id)
        self._to_record.append((command, msg))
        self._record_wake.set()

    async def _record_loop(self) -> None:
        """Record verified commands (fsynced), then acknowledge them; hand them on to run."""
        while True:
            await self._record_wake.wait()
            self._record_wake.clear()
            batch, self._to_record = self._to_record, []
            if not batch:
                continue
            rows = [(c.id, m.payload, c.expires_at) for c, m in batch]
            try:
                made = await asyncio.to_thread(self.journal.record, rows)
            except StateError as exc:
                # Not acknowledged: the broker hands them to the session's next connection.
                for c, m in batch:
                    self._in_hand.discard(c.id)
                    self.rejects.reject(
                        Rejection("command", m.topic, Reason.STORAGE_ERROR, str(exc), ref=c.id)
                    )
                continue
            for _, m in batch:
                self.session.ack(m)
            self._waiting.extend(made)
            self._run_wake.set()

    async def _command_loop(self) -> None:
        while True:
            while not self._waiting:
                await self._run_wake.wait()
                self._run_wake.clear()
            entry = self._waiting[0]
            crashpoint("updates.command.before_run")  # fault tests: recorded, acked, not run
            ref, outcome = await self._run_command(entry)
            # Done in memory at once (a copy arriving now is a replay), then on disk, then said.
            self._waiting.popleft()
            self._in_hand.discard(entry.id)
            self._done_ids.add(entry.id)
            self.stats.commands_run += 1
            summary = outcome.kind if outcome.reason is None else outcome.reason.value
            try:
                await asyncio.to_thread(self.journal.done, entry.id, f"{summary}: {outcome.detail}")
            except StateError as exc:  # it would run again after a restart
                log.error("cannot mark a command done: %s", log_text(str(exc)))
            self._event(outcome.kind, reason=outcome.reason, detail=outcome.detail, ref=ref)

    async def _run_command(self, entry: Entry) -> tuple[str, _Outcome]:
        """Run a recorded command (verified when received): its id and what came of it."""
        command = decode_document(decode_envelope(entry.payload), Command)
        if entry.expires_at <= self._clock():
            detail = f"expired at {entry.expires_at:.0f} before its turn came"
            return command.id, _Outcome("command_rejected", Reason.EXPIRED, detail)
        handler = self.commands.get(command.name)
        if handler is None:
            detail = f"this node does not do {command.name}"
            return command.id, _Outcome("command_rejected", Reason.UNSUPPORTED_COMMAND, detail)
        try:
            outcome = handler(command.args)
            if asyncio.iscoroutine(outcome):
                outcome = await outcome
        except Exception as exc:  # a handler's failure is the command's outcome, not ours
            detail = f"{command.name}: {type(exc).__name__}: {exc}"
            return command.id, _Outcome("command_rejected", Reason.COMMAND_FAILED, detail)
        return command.id, _Outcome("command_done", None, f"{command.name}: {outcome}")

    def describe(self) -> dict[str, object]:
        active = self._state.active
        return {
            "release": active.release if active else self._model_release,
            "key_set_version": self._keys.version if self._keys else None,
            "busy": self.busy,
            "in_probation": self._probation is not None,
            "commands_waiting": len(self._in_hand),
            "control_rejects": dict(self.rejects.counts),
        }


def _move(src: Path, dst: Path) -> None:
    replace_durably(src, dst)

"""The install pipeline: download → validate → swap → probation → committed | rolled back.

::

    idle ─▶ downloading ─▶ verified ─▶ validating ─▶ swapping ═▶ probation ─▶ committed
              │               │            │            │           └─▶ rolled_back
              └───────────────┴────────────┴────────────┴─▶ rejected (reason)

Each step before activation is recorded in ``pending.json``; ``═▶`` is the one atomic write of
``state.json`` that activates. The old model stays warm through probation (an instant
rollback) and is closed when the new one commits. A step that fails raises
:class:`StepFailed` (or :class:`StateError`); the caller reports the rejection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from edge_node.hardware import NodeHardware
from edge_node.updates.config import UpdatesConfig
from edge_node.updates.crashpoints import crashpoint
from edge_node.updates.download import ChunkDownload
from edge_node.updates.errors import StepFailed
from edge_node.updates.events import UpdateEvents
from edge_node.updates.files import sha256_file
from edge_node.updates.held import Held
from edge_node.updates.probation import ProbationWindow
from edge_node.updates.rejects import ControlRejects, Rejection
from edge_node.updates.state import Installed, NodeState, Probation
from edge_node.updates.stats import UpdateStats
from edge_node.updates.validate import validate
from edge_node.updates.verdicts import VerdictMemory
from edgewise.files import replace_durably
from edgewise.mqtt import Conflict, MqttConfig
from edgewise.releases import Manifest, Reason
from edgewise.serving.model import Prediction, ServedModel
from schemas import Topics

Swap = Callable[[ServedModel], ServedModel]


class Installer:
    def __init__(
        self,
        config: UpdatesConfig,
        *,
        held: Held,
        memory: VerdictMemory,
        events: UpdateEvents,
        rejects: ControlRejects,
        stats: UpdateStats,
        hardware: NodeHardware,
        mqtt: MqttConfig,
        topics: Topics,
        node_id: str,
        swap: Callable[[], Swap | None],
        clock: Callable[[], float],
        conflict: Conflict | None = None,
    ) -> None:
        """``swap()``: the node's swap, looked up at the moment of swapping."""
        self._config = config
        self._held = held
        self._memory = memory
        self._events = events
        self._rejects = rejects
        self._stats = stats
        self._hardware = hardware
        self._mqtt = mqtt
        self._topics = topics
        self._node_id = node_id
        self._swap = swap
        self._clock = clock
        self._conflict = conflict
        self.probation: ProbationWindow | None = None
        """The window open while a new model is in probation."""

    async def install(self, m: Manifest, manifest_id: str) -> None:
        held = self._held
        store = held.store
        events = self._events
        held.set_pending(manifest_id, m.release, "downloading")
        events.report("downloading", release=m.release, ref=manifest_id, detail=f"{m.size} bytes")
        local = store.artifact_path(m.sha256, m.format)
        staged = await self._download(m)
        held.set_pending(manifest_id, m.release, "verified")
        events.report("verified", release=m.release, ref=manifest_id)
        held.set_pending(manifest_id, m.release, "validating")
        events.report("validating", release=m.release, ref=manifest_id)
        try:
            model = await asyncio.to_thread(validate, staged, m, hardware=self._hardware)
        except StepFailed:
            if staged != local:
                staged.unlink(missing_ok=True)
            raise
        try:
            held.set_pending(manifest_id, m.release, "swapping")
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
            old_installed = held.state.active
            activated = NodeState(
                active=new,
                previous=old_installed,
                floor={**held.state.floor, m.name: m.release},
                probation=Probation(
                    manifest_id=manifest_id, release=m.release, started_at=self._clock()
                ),
            )
            held.set_state(activated)  # the one atomic write that activates
            crashpoint("updates.swap.after_state")
            store.save_pending(None)
        except BaseException:
            model.close()
            raise
        old_model = self._swap_in(model)
        events.report("activated", release=m.release, ref=manifest_id)
        await self._probation_window(m, manifest_id, model, old_model, old_installed)

    async def _download(self, m: Manifest) -> Path:
        """The verified artifact: the one held already (same hash) or downloaded and staged."""
        store = self._held.store
        staged = store.staged_path(m.sha256, m.format)
        local = store.artifact_path(m.sha256, m.format)
        if local.exists() and await asyncio.to_thread(sha256_file, local) == m.sha256:
            return local  # e.g. a rollback release pointing at the previous artifact
        self._stats.downloads += 1
        download = ChunkDownload(
            m,
            mqtt=self._mqtt,
            topics=self._topics,
            client_id=f"edgewise-node-{self._node_id}-download",
            partial_root=store.partial,
            staged=staged,
            on_garbage=lambda topic, payload, detail: self._rejects.reject(
                Rejection("chunk", topic, Reason.MALFORMED, detail, payload)
            ),
            conflict=self._conflict,
        )
        try:
            return await download.fetch(self._config.download_timeout_s)
        except StepFailed as exc:
            if exc.reason is not Reason.DOWNLOAD_TIMEOUT:
                download.discard()
            raise
        except OSError as exc:
            raise StepFailed(Reason.STORAGE_ERROR, str(exc)) from None

    def _swap_in(self, model: ServedModel) -> ServedModel | None:
        swap = self._swap()
        if swap is None:
            return None
        return swap(model)

    async def _probation_window(
        self,
        m: Manifest,
        manifest_id: str,
        model: ServedModel,
        old_model: ServedModel | None,
        old_installed: Installed | None,
    ) -> None:
        c = self._config
        held = self._held
        window = ProbationWindow(c)
        self.probation = window
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
            self.probation = None
        problem = window.verdict()
        if problem is None:
            held.set_state(
                NodeState(active=held.state.active, previous=old_installed, floor=held.state.floor)
            )
            held.prune()
            if old_model is not None:
                old_model.close()
            self._events.report(
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
        held.set_state(
            NodeState(active=old_installed, previous=None, floor=held.state.floor, probation=None)
        )
        self._memory.remember_rejection(manifest_id, Reason.PROBATION_FAILED, held.key_version)
        held.prune()
        self._events.report(
            "rolled_back",
            release=m.release,
            reason=Reason.PROBATION_FAILED,
            detail=problem,
            ref=manifest_id,
        )

    def observe(self, pred: Prediction | None, *, count: int, latency_s: float) -> None:
        """One batch's outcome: ``pred`` None means the batch failed."""
        window = self.probation
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


def _move(src: Path, dst: Path) -> None:
    replace_durably(src, dst)

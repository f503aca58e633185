"""Operator controls: what an operator (or the updater) can change on a running node.

Pause and resume inference (docs/adr/0065-pause-inference.md), set escalation thresholds,
recycle the inference session, and swap the served model for a new release. Each is a command
of the updater's command topic as well as a method; each says on the status what it changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from edge_node.escalation import Escalator
from edge_node.hardware import NodeHardware
from edge_node.health import Health
from edge_node.served import ServedSlot
from edge_node.stats import NodeStats
from edge_node.status import NodeStatus
from edgewise.serving.model import ServedModel

log = logging.getLogger(__name__)

Command = Callable[[Mapping[str, str]], object]


class OperatorControls:
    def __init__(
        self,
        served: ServedSlot,
        hardware: NodeHardware,
        *,
        status: NodeStatus,
        health: Health,
        stats: NodeStats,
        escalator: Escalator | None,
        waiting: Callable[[], int],
    ) -> None:
        self._served = served
        self._hardware = hardware
        self._status = status
        self._health = health
        self._stats = stats
        self._escalator = escalator
        self._waiting = waiting
        self.serving = asyncio.Event()
        """Clear while an operator has paused inference (the batcher waits on it)."""
        self.serving.set()

    def commands(self, close_window: Callable[[], Awaitable[None]]) -> dict[str, Command]:
        """The node's commands, by name, for the updater's command topic."""
        return {
            "recycle_session": lambda args: self.recycle_session(),
            "publish_telemetry": lambda args: close_window(),
            "set_threshold": self.set_threshold,
            "pause_inference": self.pause_inference,
            "resume_inference": self.resume_inference,
        }

    def swap_model(self, new: ServedModel) -> ServedModel:
        """Serve ``new`` from the next batch on; return the old model (the caller closes it)."""
        old = self._served.model
        self._served.serve(new)
        if self._escalator is not None:  # a release's thresholds go with it (and back on rollback)
            self._escalator.use_manifest_thresholds(new.name, new.thresholds)
        log.info(
            "now serving %s release %d on %s (%s)",
            new.name,
            new.release,
            new.runtime.name,
            new.runtime.provider,
        )
        self._health.model_changed(new)
        return old

    def set_threshold(self, args: Mapping[str, str]) -> str:
        """The ``set_threshold`` command: escalation thresholds for the served model (names in
        ``edge_node.escalation.policy.THRESHOLD_NAMES``) until the node restarts."""
        if self._escalator is None:
            raise ValueError("escalation is off on this node (escalation.enabled = false)")
        if not args:
            raise ValueError("give at least one threshold, e.g. escalate_below=0.8")
        model = self._served.model
        policy = self._escalator.set_thresholds(model.name, args)
        shown = policy.model_dump(exclude_none=True)
        return f"{model.name}: " + ", ".join(f"{k}={v:g}" for k, v in shown.items())

    @property
    def inference_paused(self) -> bool:
        return not self.serving.is_set()

    def pause_inference(self, args: Mapping[str, str]) -> str:
        """The ``pause_inference`` command: stop running the model. Frames keep arriving and
        wait unacknowledged (the broker holds the rest beyond the session's receive maximum);
        nothing is lost; status says ``degraded: inference_paused`` until resumed or restarted."""
        if self.inference_paused:
            return "inference was paused already"
        self.serving.clear()
        self._status.set("inference_paused", True)
        return "inference paused; frames wait unacknowledged until resume_inference"

    def resume_inference(self, args: Mapping[str, str]) -> str:
        """The ``resume_inference`` command: serve the frames that waited, then go on."""
        if not self.inference_paused:
            return "inference was not paused"
        self.serving.set()
        self._status.set("inference_paused", False)
        return f"inference resumed; {self._waiting()} frames were waiting"

    async def recycle_session(self) -> bool:
        """Load the model into a fresh inference session and swap it in between two batches.

        Frames keep being served by the old session while the new one loads; the old one is
        closed once the calls already handed to it have finished. False if the reload failed
        (the old session then goes on serving).
        """
        new = await self._served.reload(self._hardware)
        if new is None:
            return False
        self._stats.session_recycles += 1
        log.info("inference session recycled (%d so far)", self._stats.session_recycles)
        self._health.check_accelerator(new)
        return True

"""Boot and recovery: what the node does at start with the pending, active and previous state.

Run before the node serves (synchronously, once):

* a probation marker in ``state.json`` means the node stopped during probation: a failed
  probation, so the previous model is active again (``rolled_back``, remembered as rejected);
* ``pending.json`` means an update stopped before activating: the old model is still active and
  the update is reported ``abandoned`` (the retained manifest restarts it, the download resuming
  from its chunks);
* the active artifact is loaded after checking its hash; one the node cannot load (corrupt, or
  a hardware class that cannot run it) falls back to the previous one, then to the configured
  model (``None``).
"""

from __future__ import annotations

import logging

from edge_node.errors import ModelLoadError, ModelRefused
from edge_node.hardware import NodeHardware, load_model
from edge_node.updates.events import UpdateEvents
from edge_node.updates.files import sha256_file
from edge_node.updates.held import Held
from edge_node.updates.judging import stored_key_set
from edge_node.updates.state import NodeState, StateStore
from edge_node.updates.verdicts import VerdictMemory
from edgewise.releases import KeySet, Reason, Rejected
from edgewise.serving.model import ServedModel

log = logging.getLogger(__name__)


def load_keys(store: StateStore, root: bytes) -> KeySet | None:
    data = store.key_set_bytes()
    if data is None:
        return None
    try:
        return stored_key_set(data, root)
    except Rejected as exc:
        log.error("the stored key set does not verify (%s): holding none", exc)
        return None


def recover(held: Held, memory: VerdictMemory, events: UpdateEvents) -> None:
    """Finish or abandon what a crash interrupted (probation, then a pending update)."""
    store = held.store
    state = held.state
    if state.probation is not None:
        failed = state.active
        events.report(
            "rolled_back",
            release=state.probation.release,
            reason=Reason.CRASHED_IN_PROBATION,
            detail="the node stopped during probation; back on the previous model",
            ref=state.probation.manifest_id,
            running=state.previous.release if state.previous else held.model_release,
        )
        memory.remember_rejection(
            state.probation.manifest_id, Reason.CRASHED_IN_PROBATION, held.key_version
        )
        held.set_state(
            NodeState(active=state.previous, previous=None, floor=state.floor, probation=None)
        )
        log.warning(
            "update to release %s interrupted in probation: rolled back",
            failed and failed.release,
        )
    pending = store.pending()
    if pending is not None:
        events.report(
            "abandoned",
            release=pending.release,
            detail=f"interrupted at step {pending.step}; the retained manifest restarts it",
            ref=pending.manifest_id,
        )
        store.save_pending(None)


def load_active(held: Held, events: UpdateEvents, hardware: NodeHardware) -> ServedModel | None:
    """The active artifact loaded (falling back release by release); None: the configured one."""
    active = held.state.active
    while active is not None:
        path = held.store.artifact_path(active.sha256, active.format)
        try:
            if sha256_file(path) != active.sha256:
                raise ModelLoadError(f"{path} does not hash to {active.sha256[:16]}…")
            served = load_model(
                hardware,
                path,
                name=active.name,
                release=active.release,
                output=active.output_kind,
            )
            served.thresholds = dict(active.thresholds)
            return served
        except (OSError, ModelLoadError) as exc:
            previous = held.state.previous
            log.error("active release %d unusable (%s): falling back", active.release, exc)
            # E.g. the node's hardware_class changed to one that cannot run it.
            events.report(
                "rolled_back",
                release=active.release,
                reason=Reason(exc.reason) if isinstance(exc, ModelRefused) else Reason.LOAD_FAILED,
                detail=str(exc)[:1000],
                ref=active.manifest_id,
                running=previous.release if previous else held.model_release,
            )
            held.set_state(NodeState(active=previous, previous=None, floor=held.state.floor))
            active = previous
    return None

"""What the node holds now: the trusted key set and the update state, each change written first.

The in-memory copy of ``keys.signed`` and ``state.json`` (:mod:`edge_node.updates.state`): a
change reaches memory only after its atomic write, so memory never claims what a restart would
not find.
"""

from __future__ import annotations

from collections.abc import Callable

from edge_node.updates.state import Installed, NodeState, Pending, StateStore, Step
from edgewise.releases import KeySet


class Held:
    def __init__(
        self,
        store: StateStore,
        *,
        model_name: str,
        model_release: int,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.model_name = model_name
        self.model_release = model_release
        """The configured model's release: what runs while no update is active."""
        self._clock = clock
        self.keys: KeySet | None = None
        self.state = NodeState()

    @property
    def floor(self) -> int:
        held = self.state.floor.get(self.model_name, 0)
        return max(held, self.model_release)

    @property
    def active(self) -> Installed | None:
        return self.state.active

    @property
    def running_release(self) -> int:
        return self.state.active.release if self.state.active else self.model_release

    @property
    def key_version(self) -> int:
        return self.keys.version if self.keys else 0

    def set_state(self, state: NodeState) -> None:
        self.store.save_state(state)
        self.state = state

    def set_pending(self, manifest_id: str, release: int, step: Step) -> None:
        self.store.save_pending(
            Pending(manifest_id=manifest_id, release=release, step=step, started_at=self._clock())
        )

    def prune(self) -> None:
        """Delete every artifact but the active and the previous one."""
        keep = {i.sha256 for i in (self.state.active, self.state.previous) if i is not None}
        self.store.prune_artifacts(keep)

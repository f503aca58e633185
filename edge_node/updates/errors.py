"""Exceptions raised by :mod:`edge_node.updates`.

Tree::

    UpdateError
    ├── StepFailed    one step of an update (download, validation, swap) refused the release;
    │                 ``reason`` is a :class:`edgewise.releases.Reason`
    └── StateError    the update state directory cannot be read or written
"""

from __future__ import annotations

from edgewise.releases import Reason


class UpdateError(Exception):
    """Base class of every error raised by edge_node.updates."""


class StepFailed(UpdateError):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class StateError(UpdateError):
    """The state directory is unreadable or unwritable (disk full, permissions, corruption)."""

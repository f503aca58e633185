"""Exceptions raised by :mod:`edgewise.releases`.

Tree::

    ReleaseError
    ├── Rejected       a signed document failed verification; ``reason`` is a :class:`Reason`
    └── BadKey         bytes that are not a usable Ed25519 key of the expected kind
"""

from __future__ import annotations

from edgewise.releases.reasons import Reason


class ReleaseError(Exception):
    """Base class of every error raised by releases."""


class Rejected(ReleaseError):
    """A key set, manifest or command was refused: ``reason`` is stable, ``detail`` human."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[Rejected], tuple[Reason, str]]:
        return (type(self), (self.reason, self.detail))


class BadKey(ReleaseError):
    """Bytes or a file that are not an Ed25519 key of the expected kind."""

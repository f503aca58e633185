"""What the updater counts: verifications, skips, downloads, commands."""

from __future__ import annotations

from dataclasses import dataclass


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
